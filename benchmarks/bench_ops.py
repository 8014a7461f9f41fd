"""Speed of the ops core on one 1 x 160 x 192 x 224 float32 volume (IXI size), next to the peers a
TransMorph or VoxelMorph user runs: torch ``grid_sample`` (align_corners=True, the TransMorph
SpatialTransformer's displacement-to-grid conversion) and a numpy ``np.gradient`` Jacobian.

    python benchmarks/bench_ops.py            # full size, 5 timed runs each
    python benchmarks/bench_ops.py --size 64 64 64 --runs 3

Prints a markdown table: compile time (first call minus a steady call), median steady time, and
our time as a ratio to the peer where one exists (``peer / ours``, > 1 means we are faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax import ops


def _time(fn, runs: int) -> tuple[float, float]:
    """(first-call seconds, median of ``runs`` later calls in seconds)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _smooth_field(shape: tuple[int, ...], amplitude: float, seed: int) -> np.ndarray:
    """A smooth random DDF (1, D, H, W, 3) of a few voxels, like a trained network's output."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(1, 6, 6, 6, 3)).astype(np.float32)
    field = jax.image.resize(jnp.asarray(coarse), (1, *shape, 3), method="cubic")
    return np.asarray(field) * amplitude


def numpy_jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """The evaluation code behind published tables: np.gradient of each component, det(I + J)."""
    grads = [np.gradient(ddf[..., k]) for k in range(3)]  # grads[k][l] = d ddf_k / d x_l
    jac = np.empty(ddf.shape[:-1] + (3, 3), dtype=ddf.dtype)
    for k in range(3):
        for axis in range(3):
            jac[..., k, axis] = grads[k][axis] + (1.0 if k == axis else 0.0)
    return np.linalg.det(jac)


def torch_peers(image: np.ndarray, ddf: np.ndarray, runs: int) -> dict[str, float]:
    """grid_sample forward and forward+backward (w.r.t. the flow), as TransMorph calls it."""
    import torch
    import torch.nn.functional as F

    src = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 4, 1, 2, 3)))
    flow = torch.from_numpy(np.ascontiguousarray(ddf.transpose(0, 4, 1, 2, 3)))
    shape = src.shape[2:]
    vectors = [torch.arange(0, s, dtype=torch.float32) for s in shape]
    grid = torch.stack(torch.meshgrid(vectors, indexing="ij")).unsqueeze(0)

    def transform(flow_tensor):
        new_locs = grid + flow_tensor
        new_locs = torch.stack(
            [2 * (new_locs[:, i] / (shape[i] - 1) - 0.5) for i in range(3)], dim=1
        )
        new_locs = new_locs.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
        return F.grid_sample(src, new_locs, align_corners=True, mode="bilinear")

    def forward():
        with torch.no_grad():
            return transform(flow)

    def forward_backward():
        flow_var = flow.clone().requires_grad_(True)
        out = transform(flow_var)
        out.square().mean().backward()
        return flow_var.grad

    results = {}
    for name, fn in (("warp fwd", forward), ("warp fwd+bwd (ddf)", forward_backward)):
        fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(160, 192, 224))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(args.size)

    rng = np.random.default_rng(0)
    image_np = rng.random((1, *shape, 1), dtype=np.float32)
    other_np = rng.random((1, *shape, 1), dtype=np.float32)
    ddf_np = _smooth_field(shape, 3.0, seed=1)
    image, other, ddf = (jnp.asarray(a) for a in (image_np, other_np, ddf_np))

    warp_fwd = jax.jit(lambda im, d: ops.warp(im, d))
    warp_bwd = jax.jit(jax.grad(lambda d, im: jnp.mean(ops.warp(im, d) ** 2)))
    jac = jax.jit(ops.jacobian_determinant)
    ncc_bwd = jax.jit(jax.value_and_grad(lambda a, b: -jnp.mean(ops.ncc_local(a, b))))
    ssim_fwd = jax.jit(lambda a, b: ops.ssim(a, b))

    ours = {
        "warp fwd": _time(lambda: warp_fwd(image, ddf), args.runs),
        "warp fwd+bwd (ddf)": _time(lambda: warp_bwd(ddf, image), args.runs),
        "jacobian_determinant": _time(lambda: jac(ddf), args.runs),
        "ncc_local fwd+bwd": _time(lambda: ncc_bwd(image, other), args.runs),
        "ssim fwd": _time(lambda: ssim_fwd(image, other), args.runs),
    }

    peers: dict[str, tuple[str, float]] = {}
    try:
        for name, seconds in torch_peers(image_np, ddf_np, args.runs).items():
            peers[name] = ("torch grid_sample", seconds)
    except ImportError:
        print("torch not installed: no grid_sample column (pip install torch==2.13.0)")
    numpy_times = []
    for _ in range(max(1, args.runs // 2)):
        start = time.perf_counter()
        numpy_jacobian_determinant(ddf_np[0])
        numpy_times.append(time.perf_counter() - start)
    peers["jacobian_determinant"] = ("numpy np.gradient", statistics.median(numpy_times))

    print(
        f"\nops on 1 x {' x '.join(map(str, shape))} float32, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, median of {args.runs}\n"
    )
    print("| op | compile s | ours ms | peer | peer ms | speed-up (peer/ours) |")
    print("|---|---|---|---|---|---|")
    for name, (first, steady) in ours.items():
        peer_name, peer_s = peers.get(name, ("", float("nan")))
        ratio = f"{peer_s / steady:.1f}x" if peer_name else ""
        peer_ms = f"{peer_s * 1e3:.0f}" if peer_name else ""
        print(
            f"| {name} | {max(first - steady, 0.0):.2f} | {steady * 1e3:.0f} | {peer_name} | "
            f"{peer_ms} | {ratio} |"
        )


if __name__ == "__main__":
    main()
