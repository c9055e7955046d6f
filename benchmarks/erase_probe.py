"""A probe, not a feature: random erasing (Zhong et al. 2017) on top of `--augment affine`, to
see whether it pays before writing it into the augmentation kernel (docs/ACCURACY.md, "Random
erasing"). Each augmented image, with probability 1/2, gets one rectangle of 2-20 % of its area
(aspect 0.3-3.3) set to zero (recipe afferz) or to uniform noise (affern), drawn from
(seed, epoch, sample) like the kernel's transforms, written in NumPy over each thread's rows
after the kernel has written them.

    echo 19 > /proc/self/autogroup; nice -n 19 .venv/bin/python -W ignore \\
        benchmarks/erase_probe.py /tmp/acc11e afferz_s1 affern_s1 afferz_s2 affern_s2

Runs are ensemble_members.py's: its records, its shared validation split, voted by its `vote`.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ensemble_members as em  # noqa: E402

from parnn.engines import batch  # noqa: E402

ERASE = {"afferz": "zero", "affern": "noise"}                        # recipe: the fill
P, AREA, ASPECT = 0.5, (0.02, 0.2), (0.3, 1 / 0.3)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
fill_now = []                # the fill of the run being trained
kernel_fill, kernel_rows = batch.Augmentation.fill, batch.Augmentation.fill_rows


def mix(z):
    """splitmix64 over uint64 arrays (wrapping)."""
    z = z + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def unit(z):
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def erase(seed, epoch, idx, out, side=28):
    """One rectangle per chosen row of out (the images of samples idx), in place."""
    with np.errstate(over="ignore"):
        key = mix(mix(np.uint64(seed + 12345) ^ np.uint64(epoch)) ^ idx.astype(np.uint64))
        on, a, r, y, x = (unit(mix(key + np.uint64(k) * GOLDEN)) for k in range(5))
        area = (AREA[0] + (AREA[1] - AREA[0]) * a) * side * side
        aspect = np.exp(np.log(ASPECT[0]) + np.log(ASPECT[1] / ASPECT[0]) * r)
        h = np.clip(np.round(np.sqrt(area * aspect)), 1, side).astype(int)
        w = np.clip(np.round(np.sqrt(area / aspect)), 1, side).astype(int)
        y0, x0 = (y * (side + 1 - h)).astype(int), (x * (side + 1 - w)).astype(int)
        v, u = np.arange(side)[None, :, None], np.arange(side)[None, None, :]
        m = ((v >= y0[:, None, None]) & (v < (y0 + h)[:, None, None])
             & (u >= x0[:, None, None]) & (u < (x0 + w)[:, None, None])
             & (on < P)[:, None, None]).reshape(len(idx), side * side)
        if fill_now == ["zero"]:
            out[m] = 0
        else:
            pixel = np.arange(side * side, dtype=np.uint64)[None, :]
            out[m] = unit(mix(key[:, None] + pixel)).astype(out.dtype)[m]


def fill(self, X, idx, out, epoch):
    kernel_fill(self, X, idx, out, epoch)
    erase(self.seed, epoch, idx, out)
    return out


def fill_rows(self, X, idx, out, epoch, lo, hi):
    kernel_rows(self, X, idx, out, epoch, lo, hi)
    erase(self.seed, epoch, idx[lo:hi], out[lo:hi])
    return out


def main(out, jobs):
    batch.Augmentation.fill, batch.Augmentation.fill_rows = fill, fill_rows
    for recipe in ERASE:
        em.RECIPES[recipe] = dict(augment="affine")       # the chosen ranges (run.config.AFFINE)
        em.RECIPES[recipe + "e60"] = dict(augment="affine", epochs=60)
    for job in jobs:
        fill_now[:] = [ERASE[job[:len("afferz")]]]
        em.train(out, [job])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
