"""Pretrain a ResNet backbone by classifying object crops of synthetic scenes, for --pretrained segmentation runs.

    python benchmarks/pretrain_backbone.py --out backbone_r18.pth
    python benchmarks/scribble_ablation.py --pretrained backbone_r18.pth

It stands in for ImageNet weights on the built-in data: tools/make_object_crops.py draws scenes like the built-in
ones from their own random stream (no image of the segmentation splits), crops each object with its class and some
background, and train.py --task classification trains a ResNet with the ImageNet stem on them. The best checkpoint
(by val top-1 on a held-out fifth of the crops) is copied to --out; --pretrained takes its backbone tensors and leaves
the classifier out.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from timed_run import ROOT, timed_run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the checkpoint (a new file)")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--scenes", type=int, default=2000, help="scenes to crop (about 3.4 crops each)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"--out {args.out} exists; expected a new file (nothing is overwritten)")
    with tempfile.TemporaryDirectory() as workdir:
        crops, logdir = os.path.join(workdir, "crops"), os.path.join(workdir, "run")
        subprocess.run([sys.executable, "tools/make_object_crops.py", "--out", crops, "--scenes", str(args.scenes),
                        "--seed", str(args.seed)], cwd=ROOT, check=True)
        cmd = [sys.executable, "train.py", "--task", "classification", "--dataset_path", crops,
               "--split_ratio", "0.8", "0.2", "--model_type", "resnet", "--layers", str(args.layers),
               "--stem", "imagenet", "--image_size", "64", "--train_crop", "random_resized", "--rrc_scale", "0.5", "1",
               "--epochs", str(args.epochs), "--batchsize", "64", "--lr", "0.05", "--warmup_epochs", "1",
               "--lr_scheduler", "cosine", "--seed", str(args.seed), "--no_progress", "--logdir", logdir]
        seconds, best, last = timed_run(cmd, dict(os.environ), logdir, "val_top1", quiet_stderr=True)
        shutil.copyfile(os.path.join(logdir, "best.pth"), args.out)
    print(f"{args.out}: ResNet-{args.layers} on object crops, best val top-1 {best:.4f} (last {last:.4f}), "
          f"{args.epochs} epochs, {seconds:.0f} s")


if __name__ == "__main__":
    main()
