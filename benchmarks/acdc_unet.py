"""The 2D MONAI UNet baseline (``acdc.py unet``): trained slice-wise under a budget of CPU-minutes, scored on the ACDC
test frames at their own grids, with each frame's class volumes kept for the clinical measures.

The network is Model Zoo ``ventricular_short_axis_3label``'s (UNet, 16-256 channels, strides 2, 2 residual units),
trained with DiceCE and Adam 1e-3 on 224 x 224 random crops of slices padded to 256 x 256, the bundle's percentile
intensity scaling; whole slices at test time. The budget is process CPU time per torch thread, so other processes
sharing the cores do not shrink it; the state is saved every ``--save-minutes`` and a rerun resumes from it.

    python benchmarks/acdc.py unet --budget-minutes 12 --work-dir benchmarks/results/acdc_unet12
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from acdc_common import (
    CLASSES,
    RESULTS,
    acdc_datalist,
    add_options,
    command_parser,
    compute_seconds,
    dice_of,
    first_patients,
    require_data,
    write_record,
)
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    DivisiblePad,
    LoadImaged,
    MapLabelValued,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
)

from nisf_monai.data import load_datalist, read_label_mapping
from nisf_monai.geometry.measures import class_volumes
from nisf_monai.spatial import voxel_volume_ml

logger = logging.getLogger("acdc.unet")


def preprocessing(mapping: dict[int, int]) -> list:
    """Loading, the ACDC -> bundle label mapping and the bundle's percentile scaling."""
    return [
        LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True),
        MapLabelValued("label", list(mapping), list(mapping.values())),
        ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
    ]


class SliceDataset(torch.utils.data.Dataset):
    """Every short-axis slice of cached volumes as a 2D sample (the baseline is slice-wise)."""

    def __init__(self, volumes: CacheDataset, transform) -> None:
        self.volumes = volumes
        self.index = [(v, z) for v in range(len(volumes)) for z in range(volumes[v]["image"].shape[-1])]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        v, z = self.index[i]
        item = self.volumes[v]
        return self.transform({"image": item["image"][..., z], "label": item["label"][..., z]})


def network() -> UNet:
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=4,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    )


def save_state(path: Path, state: dict) -> None:
    """Write the training state all or nothing, so an interrupted save leaves the previous one."""
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def train(
    items: list[dict], mapping: dict[int, int], budget_s: float, args: argparse.Namespace, state_path: Path
) -> tuple[torch.nn.Module, float, float, int]:
    """Train for ``budget_s`` CPU-seconds, resuming from ``state_path`` when it exists.

    Returns the network, wall seconds, CPU seconds and iterations."""
    volumes = CacheDataset(items, Compose(preprocessing(mapping)), cache_rate=1.0, progress=False)
    crops = Compose(
        [
            ResizeWithPadOrCropd(["image", "label"], (256, 256)),
            RandSpatialCropd(["image", "label"], (224, 224), random_size=False),
        ]
    )
    loader = DataLoader(SliceDataset(volumes, crops), batch_size=args.batch_size, shuffle=True, num_workers=0)
    net = network()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    # DiceLoss alone left the RV unlearned (Dice 0.02 on every test frame): the soft Dice of a class absent from most
    # crops gives it almost no gradient, where cross-entropy gives every pixel of every class one.
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    spent_cpu, spent_wall, iterations = 0.0, 0.0, 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        spent_cpu, spent_wall, iterations = state["compute_s"], state["wall_s"], state["iterations"]
        logger.info("resumed from %s: %d iterations, %.1f CPU-min", state_path, iterations, spent_cpu / 60)
    start, start_cpu = time.perf_counter(), compute_seconds()
    last_save = start_cpu

    def used() -> float:
        return spent_cpu + compute_seconds() - start_cpu

    def save() -> None:
        state = {"net": net.state_dict(), "optimizer": optimizer.state_dict(), "compute_s": used()}
        save_state(state_path, state | {"wall_s": spent_wall + time.perf_counter() - start, "iterations": iterations})

    net.train()
    while used() < budget_s:
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(batch["image"].as_tensor()), batch["label"].as_tensor())
            loss.backward()
            optimizer.step()
            iterations += 1
            if compute_seconds() - last_save >= args.save_minutes * 60:
                save()
                last_save = compute_seconds()
                logger.info("%d iterations, %.1f of %.1f CPU-min", iterations, used() / 60, budget_s / 60)
            if used() >= budget_s:
                break
    save()
    return net.eval(), spent_wall + time.perf_counter() - start, used(), iterations


@torch.no_grad()
def evaluate(net: torch.nn.Module, items: list[dict], mapping: dict[int, int]) -> tuple[list[dict], float]:
    """Per-frame Dice and class volumes (voxel counts on the acquired grid) of whole slices; (cases, wall s)."""
    tf = Compose(preprocessing(mapping))
    pad = DivisiblePad(16, method="end")  # padded at the end only, so cropping from the start realigns
    cases, start = [], time.perf_counter()
    for item in items:
        d = tf(item)
        image, label = d["image"], d["label"][0]
        padded = torch.stack([torch.as_tensor(pad(s)) for s in image.movedim(-1, 0)])  # (Z, 1, X, Y)
        pred = net(padded)[..., : image.shape[1], : image.shape[2]].argmax(1).movedim(0, -1)
        voxel_ml = voxel_volume_ml(image.affine)
        cases.append(
            {
                "case": Path(item["image"]).name,
                "dice": dice_of(pred, label).tolist(),
                "volumes_ml": class_volumes(pred.numpy(), voxel_ml),
                "manual_volumes_ml": class_volumes(label.numpy(), voxel_ml),
            }
        )
    return cases, time.perf_counter() - start


def summary(cases: list[dict]) -> dict[str, list[float]]:
    """[mean, std] over frames per class and of the frames' class means."""
    dice = np.asarray([c["dice"] for c in cases], dtype=float)
    with np.errstate(invalid="ignore"):
        per_class = {
            name: [float(np.nanmean(dice[:, k])), float(np.nanstd(dice[:, k]))] for k, name in enumerate(CLASSES)
        }
        means = np.nanmean(dice, axis=1)
    return per_class | {"mean": [float(np.nanmean(means)), float(np.nanstd(means))]}


def main(argv: list[str] | None = None) -> dict:
    ap = command_parser("unet", __doc__)
    add_options(ap, "data", "work_dir", "threads", work_dir=str(RESULTS / "acdc_unet"))
    ap.add_argument("--budget-minutes", type=float, default=12.0, help="training CPU-minutes (per torch thread)")
    ap.add_argument(
        "--parts",
        default="training",
        help="comma-separated datalist parts trained on (training,validation: 60 patients)",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--save-minutes", type=float, default=5.0, help="CPU-minutes between saves of unet_state.pt")
    ap.add_argument("--limit", type=int, default=0, help="only the first N patients of each part (a smoke test)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    require_data(args.data)
    work = Path(args.work_dir)
    datalist = acdc_datalist(work, data=args.data)
    mapping = read_label_mapping(datalist)
    parts = args.parts.split(",")
    items = [item for part in parts for item in first_patients(load_datalist(datalist, part), args.limit)]
    net, train_s, train_cpu, iterations = train(
        items, mapping, args.budget_minutes * 60.0, args, work / "unet_state.pt"
    )
    cases, test_s = evaluate(net, first_patients(load_datalist(datalist, "test"), args.limit), mapping)
    result = {
        "budget_minutes": args.budget_minutes,
        "torch_threads": torch.get_num_threads(),
        "training_parts": parts,
        "training_frames": len(items),
        "summary": summary(cases),
        "train_s": train_s,
        "train_compute_s": train_cpu,
        "train_iterations": iterations,
        "test_inference_s": test_s,
        "cases": cases,
    }
    out = write_record(work / "acdc_unet.json", result)
    s = result["summary"]
    print(
        "UNet "
        + "  ".join(f"{k} {s[k][0]:.3f} ± {s[k][1]:.3f}" for k in (*CLASSES, "mean"))
        + f"  ({iterations} iterations, {train_cpu / 60:.1f} CPU-min); written {out}"
    )
    return result


if __name__ == "__main__":
    from acdc_common import through_entry_point

    through_entry_point(__file__)
