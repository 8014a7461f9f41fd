"""DIR-Lab 4D-CT (lung), the paper's settings: fixed = T00 (end-inhale), moving = T50
(end-exhale), leave-one-case-out, HU window then [0, 1], Adam 1e-4 halved every 20 epochs,
200 epochs, early stopping with patience 20 on the validation TRE, batch size 1, the landmark
(TRE) term on.

    python train.py --config configs/dirlab.py --workdir runs/dirlab_case1 \
        --config.data.root=/data/dirlab --config.data.test_case=1
    python eval.py --config configs/dirlab.py --workdir runs/dirlab_case1 \
        --config.data.root=/data/dirlab --config.data.test_case=1
    # after all ten: the Table-I-like summary (per-case TRE mean (std), 10-case mean)
    python eval.py --config configs/dirlab.py --workdir runs/dirlab \
        --dirlab_runs runs/dirlab_case1,runs/dirlab_case2,...,runs/dirlab_case10

data.root holds Case1Pack ... Case10Pack (Case8Deploy) as downloaded.

What the network sees. Every case is resampled to about 2.5 x 1.5 x 1.5 mm (z y x; the nearest
whole number of voxels, so the in-plane spacing differs from 1.5 mm by at most 0.3 %), then cut
or zero padded to one grid of 144 x 192 x 256 voxels (z y x; D, H, W = 360 x 288 x 384 mm),
whose window is centred on the lungs: the bounding box of the air that the body encloses
(below -500 HU, found in the T00 and T50 images, ``preprocess.lung_bounding_box``) and moved
to stay inside the scan. z is never cut (at most 136 slices of 2.5 mm); the lungs' box and all
300 landmark pairs lie in the grid for every case (benchmarks/dirlab_preprocessing.py). A
landmark that a different grid leaves outside is marked not real and counted (evaluation's
"landmarks in TRE"); the TRE is reported in the original images' mm.

    case  size x y z   x,y mm  resampled x y z  grid x,y mm  scan FOV mm  FOV in the grid
      1   256x256x94   0.97    166x166x94       1.496        248x248x235  all
      2   256x256x112  1.16    198x198x112      1.500        297x297x280  y 288 of 297
      3   256x256x104  1.15    196x196x104      1.502        294x294x260  y 288 of 294
      4   256x256x99   1.13    193x193x99       1.499        289x289x248  y 288 of 289
      5   256x256x106  1.10    188x188x106      1.498        282x282x265  all
      6   512x512x128  0.97    331x331x128      1.500        497x497x320  384x288x320
      7   512x512x136  0.97    331x331x136      1.500        497x497x340  384x288x340
      8   512x512x128  0.97    331x331x128      1.500        497x497x320  384x288x320
      9   512x512x128  0.97    331x331x128      1.500        497x497x320  384x288x320
     10   512x512x120  0.97    331x331x120      1.500        497x497x300  384x288x300

z keeps 2.5 mm. Over the ten cases the landmarks span at most 255 mm in x, 188 mm in y and
225 mm in z. The deepest U-Net map is 9 x 12 x 16 (stride 16), cut into 3 x 4 x 4 RAA regions.
DIR-Lab's .img values are taken as HU; if yours store HU + 1024, set
--config.data.hu_offset=-1024 (the lung search stops with that advice when it finds no air).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.dataset = "dirlab"
    config.data.image_size = (144, 192, 256)  # (D, H, W) = 360 x 288 x 384 mm
    config.data.spacing_mm = (2.5, 1.5, 1.5)  # every case resampled to about this spacing
    config.data.crop_center = "lungs"  # the window is centred on the lungs (HU, T00 and T50)
    config.data.hu_offset = 0.0  # DIR-Lab .img values taken as HU
    config.data.hu_window = (-1000.0, 500.0)
    config.data.test_case = 1
    config.data.cross_phase = True
    config.data.num_workers = 2
    config.model.region_size = (3, 4, 4)  # deepest map 9 x 12 x 16: 3 x 3 x 4 = 36 regions
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
