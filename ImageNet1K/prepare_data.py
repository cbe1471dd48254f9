"""Arrange the official ImageNet-1k archives into the ImageFolder layout this experiment reads.

Put ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz (from
https://image-net.org/download-images, ILSVRC2012) in <data-root>/imagenet/ and run

    python ImageNet1K/prepare_data.py --data-root <data-root>

torchvision's ImageNet dataset checks the archives' md5 sums and extracts them into
<data-root>/imagenet/train/<wnid>/*.JPEG and <data-root>/imagenet/val/<wnid>/*.JPEG (the 50k validation
images sorted into their class folders with the devkit's ground truth). This takes a while and needs
about 150 GB next to the archives, which may be deleted afterwards. If it is interrupted, delete the
half-extracted train/ or val/ folder before running it again.
"""
import argparse
import os
import sys
from pathlib import Path

from common.errors import UserError, cli_main, require

ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("SAE_CEPTION_DATA", "./data"),
                        help="data root (default $SAE_CEPTION_DATA or ./data)")
    parser.add_argument("--folder", default="imagenet", help="sub-folder holding the archives (config data.folder)")
    args = parser.parse_args(argv)
    root = Path(args.data_root) / args.folder
    done = [split for split in ("train", "val") if (root / split).is_dir() and any((root / split).iterdir())]
    if len(done) == 2:
        print(f"{root}/train and {root}/val already exist; nothing to do")
        return
    missing = [name for name in ARCHIVES if not (root / name).is_file()]
    require(not missing, f"{', '.join(missing)} not found in {root}; download them (ILSVRC2012) from "
                         f"https://image-net.org/download-images into {root} and rerun")
    from torchvision.datasets import ImageNet

    for split in ("train", "val"):
        print(f"arranging the {split} split into {root / split} (checks md5 sums, then extracts) ...", flush=True)
        try:
            data = ImageNet(os.fspath(root), split=split)
        except RuntimeError as err:  # torchvision: archive missing or md5 mismatch
            raise UserError(f"could not arrange the {split} split: {err}") from None
        print(f"{split}: {len(data.samples):,} images in {len(data.wnids)} class folders")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
