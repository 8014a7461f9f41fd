"""DIR-Lab 4D-CT (lung), the paper's settings: fixed = T00 (end-inhale), moving = T50
(end-exhale), leave-one-case-out, HU window then [0, 1], Adam 1e-4 halved every 20 epochs,
200 epochs, early stopping with patience 20 on the validation TRE, batch size 1, the landmark
(TRE) term on.

    python train.py --config configs/dirlab.py --workdir runs/dirlab_case1 \
        --config.data.root=/data/dirlab --config.data.test_case=1
    python eval.py --config configs/dirlab.py --workdir runs/dirlab_case1 \
        --config.data.root=/data/dirlab --config.data.test_case=1

data.root holds Case1Pack ... Case10Pack (Case8Deploy) as downloaded.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "dirlab"
    config.data.image_size = (96, 256, 256)  # (D, H, W): z padded/cropped, full in-plane grid
    config.data.hu_window = (-1000.0, 500.0)
    config.data.test_case = 1
    config.data.cross_phase = True
    config.data.num_workers = 2
    config.model.region_size = (2, 4, 4)  # deepest map is 6 x 16 x 16 at this size
    config.loss.ncc_weight = 1.0
    config.loss.ssim_weight = 1.0
    config.loss.smooth_weight = 1.0
    config.loss.jacobian_weight = 0.1
    config.loss.landmark_weight = 0.1
    config.train.learning_rate = 1e-4
    config.train.lr_decay_factor = 0.5
    config.train.lr_decay_epochs = 20
    config.train.steps_per_epoch = 90  # 9 training cases x 10 phase pairs
    config.train.epochs = 200
    config.train.eval_every = 90
    config.train.checkpoint_every = 90
    config.train.best_metric = "val/tre_mm"
    config.train.best_mode = "min"
    config.train.early_stopping_patience = 20
    return config
