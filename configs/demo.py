"""Demo: AD-RegNet on generated brain pairs (the packaged 2 mm MNI152 atlas), sized for a CPU.

    python train.py --config configs/demo.py --workdir runs/demo
    python train.py --config configs/demo.py --workdir runs/demo --config.train.max_steps=50
    python eval.py  --config configs/demo.py --workdir runs/demo

Learns visibly (validation Dice over CSF, grey and white matter rises above the unregistered
Dice) within a few minutes on 2 CPU cores.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.channels = (8, 16, 16, 32)
    config.model.convs_per_level = 1
    config.model.cross_attention_levels = (2, 3)
    config.model.attention_heads = 2
    config.model.region_size = (2, 2, 2)
    config.model.region_heads = 2
    config.data.image_size = (32, 40, 32)
    config.data.val_size = 4
    config.loss.ssim_weight = 0.5
    config.train.learning_rate = 2e-3
    config.train.steps_per_epoch = 50
    config.train.lr_decay_epochs = 4
    config.train.max_steps = 200
    config.train.log_every = 10
    config.train.eval_every = 50
    config.train.checkpoint_every = 50
    config.train.early_stopping_patience = 0
    return config
