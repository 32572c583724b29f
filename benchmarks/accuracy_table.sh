#!/bin/bash
# The accuracy table of benchmarks/results/accuracy.md (run from the repository root; see README step 13).
# This session's one new row is the seed-resnet50 preset (random init: no offline ResNet weights), made by:
#   pneumoscope train --config seed-resnet50 --set model.pretrained=false --out out/seeds/seed-resnet50
#   (stopped after 6 of its 10 epochs for CPU time, about 13 min an epoch here, then finished with
#    pneumoscope train --resume out/seeds/seed-resnet50 --set train.phases.0.epochs=6)
# Every other row is carried over unchanged (LABEL=@previous) from the table of commit ed6bcc8, whose run
# directories are gone: its command is in that accuracy.json; rows marked "earlier session (TTA-8 mean)" are
# older still (commit dadff83) and are TTA-8 means from before single-pass evaluation.
set -e
export PYTHONPATH=src
git show ed6bcc8:benchmarks/results/accuracy.json > /tmp/accuracy_previous.json
python benchmarks/bench_accuracy.py --data ../shared/data/chest_xray --previous /tmp/accuracy_previous.json \
  --default "default, main-job run of 2026-12-01=@previous" \
  --single "bundled model (same recipe, 3-channel input)=@previous" \
           "default recipe on the ordered validation split (round 2, not adopted)=@previous" \
           "earlier session (TTA-8 mean): v2 variant (5 views, LS 0.1, wd 0.05)=@previous" \
           "earlier session (TTA-8 mean): mean of the 4 default-family runs=@previous" \
  --seed-preset "seed-efficientnet (EfficientNet-Lite0 ImageNet weights in place of B0)=@previous" \
                "seed-cnn5-focal (from scratch, as in the notebook)=@previous" \
                "earlier session (TTA-8 mean): seed-cnn3=@previous" \
                "earlier session (TTA-8 mean): seed-resnet18 (random init: no offline ResNet weights)=@previous" \
                "seed-resnet50 (random init: no offline ResNet weights; 6 of 10 epochs)=out/seeds/seed-resnet50" \
  --best-single "default, main-job run of 2026-12-01" \
  --note "Rows other than seed-resnet50 are carried over unchanged from the table of commit ed6bcc8 (bench_accuracy.py LABEL=@previous; their run directories are gone). Best single = the main-job \`default\` run: \`default\` is the recipe the pre-registered rules of docs/recipe_selection.md kept. No ensemble was built in the last two sessions (the one fixed in advance, main-job default + seed-efficientnet, is buildable since 2026-12-07, when ensembles began to take members with their own preprocessing, but its runs are gone), so the ensemble row is the earlier session's. seed-resnet50: no ResNet ImageNet weights can be installed offline, so its frozen layer1-2 are random; it was stopped after 6 of its 10 epochs for CPU time (about 13 min an epoch on 2 cores), epoch and threshold chosen on validation among those."
