#!/bin/bash
# The accuracy table of benchmarks/results/accuracy.md (run from the repository root; see README step 13).
set -e
export PYTHONPATH=src
python benchmarks/bench_accuracy.py --data ../shared/data/chest_xray \
  --default "default, quiet-machine run (time_to_quality)=out/ttq/default" \
  --single "default, main_job run=out/bench_main/runs/default" "default v1 (3-channel input)=out/bench_main_v1/runs/default" "v2 variant (5 views, LS 0.1, wd 0.05)=out/bench_main_v2/runs/default" \
  --ensemble "mean of the 4 default-family runs=out/ens_default" \
  --seed-preset "seed-cnn3=out/seeds/seed-cnn3" "seed-resnet18 (random init: no offline ResNet weights)=out/seeds/seed-resnet18" \
  --note "Seed presets not run in this session (CPU time): seed-efficientnet (with the installable EfficientNet-Lite0 weights in place of B0), seed-cnn5-focal, seed-resnet50; commands: \`pneumoscope train --config seed-efficientnet --set model.name=efficientnet_lite0\`, \`--config seed-cnn5-focal\`, \`--config seed-resnet50 --set model.pretrained=false\`."
