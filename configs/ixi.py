"""IXI brain T1 (TransMorph's preprocessed release), the paper's settings: atlas-to-subject
(moving = atlas, fixed = subject), full 160 x 192 x 224 volumes, Adam 1e-4 halved every 20 epochs,
200 epochs, early stopping with patience 20, batch size 1, loss -(NCC + SSIM) + smoothness +
negative-Jacobian penalty.

    python train.py --config configs/ixi.py --workdir runs/ixi --config.data.root=/data/IXI_data
    python train.py --config configs/ixi.py --workdir runs/ixi_unet \
        --config.data.root=/data/IXI_data --config.model.use_cross_attention=False \
        --config.model.use_regional_attention=False --config.model.use_multires=False
    python eval.py --config configs/ixi.py --workdir runs/ixi --config.data.root=/data/IXI_data

data.root holds atlas.pkl and Train/, Val/, Test/ (one pickle per subject).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "ixi"
    config.data.image_size = (160, 192, 224)
    config.data.batch_size = 1
    config.data.num_workers = 2
    config.model.region_size = (2, 2, 2)  # deepest map is 10 x 12 x 14 at this size
    config.loss.ncc_weight = 1.0
    config.loss.ssim_weight = 1.0
    config.loss.smooth_weight = 1.0
    config.loss.jacobian_weight = 0.1
    config.loss.landmark_weight = 0.0
    config.train.learning_rate = 1e-4
    config.train.lr_decay_factor = 0.5
    config.train.lr_decay_epochs = 20
    config.train.steps_per_epoch = 403  # one pass over the 403 training subjects
    config.train.epochs = 200
    config.train.eval_every = 403
    config.train.checkpoint_every = 403
    config.train.best_metric = "val/dice"
    config.train.best_mode = "max"
    config.train.early_stopping_patience = 20
    return config
