#!/bin/bash
# The accuracy table of benchmarks/results/accuracy.md (run from the repository root; see README step 13).
# Inputs, made first (2-core CPU, about 40 min in all):
#   PYTHONPATH=src python benchmarks/bench_main_job.py --data ../shared/data/chest_xray --out out/bench_main_tuned
#   pneumoscope run --config experiments/candidates/ordered/default.yaml --out out/r2_default   (round 2, not adopted)
#   pneumoscope train --config seed-efficientnet --set model.name=efficientnet_lite0 --out out/seeds/seed-efficientnet
#   pneumoscope train --config seed-cnn5-focal --out out/seeds/seed-cnn5-focal      (~80 min here)
# Rows of earlier sessions whose run directories are gone come from the committed accuracy.json of
# commit dadff83 (their figures are TTA-8 means, from before single-pass evaluation).
set -e
export PYTHONPATH=src
git show dadff83:benchmarks/results/accuracy.json > /tmp/accuracy_previous.json
python benchmarks/bench_accuracy.py --data ../shared/data/chest_xray \
  --default "default, main-job run of 2026-12-01=out/bench_main_tuned/runs/default" \
  --single "bundled model (same recipe, 3-channel input)=src/pneumoscope/weights/default" \
           "default recipe on the ordered validation split (round 2, not adopted)=out/r2_default/runs/default-ordered" \
  --seed-preset "seed-efficientnet (EfficientNet-Lite0 ImageNet weights in place of B0)=out/seeds/seed-efficientnet" \
                "seed-cnn5-focal (from scratch, as in the notebook)=out/seeds/seed-cnn5-focal" \
  --best-single "default, main-job run of 2026-12-01" \
  --previous /tmp/accuracy_previous.json \
  --previous-label "seed-cnn3" --previous-label "seed-resnet18 (random init: no offline ResNet weights)" \
  --previous-label "v2 variant (5 views, LS 0.1, wd 0.05)" --previous-label "mean of the 4 default-family runs" \
  --note "Best single = the main-job \`default\` run: \`default\` is the recipe the pre-registered rules of docs/recipe_selection.md kept; no ensemble was built this session (the one fixed in advance could not be: members must share preprocessing), so the ensemble row is the earlier session's. Seed preset not run (CPU time on 2 cores): seed-resnet50 (no offline ResNet weights; a full ResNet-50 training step runs at 4.5 img/s here, its preset trains layer3 + layer4 on cached layer2 features, about 8 img/s by their share of the MACs, so 10 epochs take about 1.5 h plus the feature pass); command: \`pneumoscope train --config seed-resnet50 --set model.pretrained=false\`."
