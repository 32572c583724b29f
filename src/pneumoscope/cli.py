"""The ``pneumoscope`` command line: thin, each subcommand calls one library function.

Errors a user can cause (bad file, bad config key, missing data) are printed as one line
``pneumoscope: error: <file or key>: <problem>`` with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pneumoscope import __version__
from pneumoscope.errors import PneumoscopeError

log = logging.getLogger("pneumoscope.cli")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 reports progress
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for noisy in ("PIL", "matplotlib", "urllib3", "httpx", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on an interactive terminal; logs only when output goes to a file or CI."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _data_arg(p: argparse.ArgumentParser, positional: bool = False) -> None:
    help_ = "dataset folder (Kaggle layout, class folders) or CSV; default $PNEUMOSCOPE_DATA"
    if positional:
        p.add_argument("data", nargs="?", default=None, help=help_)
    else:
        p.add_argument("--data", default=None, help=help_)


# --------------------------------------------------------------------------- commands
def cmd_data_check(args: argparse.Namespace) -> int:
    from pneumoscope.data.check import check_command

    return check_command(args.data or args.data_opt, Path(args.out), manifest_out=Path(args.manifest) if args.manifest else None,
                         val_fraction=args.val_fraction, seed=args.seed, split_method=args.split,
                         val_source=args.val_source, progress=_progress(args))


def cmd_train(args: argparse.Namespace) -> int:
    from pneumoscope.data.paths import resolve_data_root
    from pneumoscope.train.fit import train_from_files

    root = resolve_data_root(args.data)
    summary = train_from_files(args.config, args.set or [], args.out, root, resume=args.resume,
                               progress=_progress(args))
    vm = summary.get("val_metrics", {})
    log.info("run: %s | best epoch %s | val AUROC %s", summary.get("run_dir"), summary.get("best_epoch"),
             vm.get("auroc", vm.get("macro_auroc")))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pneumoscope.data.paths import resolve_data_root
    from pneumoscope.evaluate.run import evaluate_model

    res = evaluate_model(args.run, resolve_data_root(args.data), split=args.split, out=args.out,
                         bootstrap=args.bootstrap, tta=args.tta, refer_fraction=args.refer_fraction,
                         progress=_progress(args))
    sys.stdout.write(Path(res["out_dir"], "metrics.md").read_text())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pneumoscope.pipeline import main_job

    return main_job(args.data, Path(args.out), config=args.config, overrides=args.set or [],
                    progress=_progress(args))


def cmd_report(args: argparse.Namespace) -> int:
    from pneumoscope.report.html import build_report

    path = build_report(args.run, args.out, data_check_dir=args.data_check)
    sys.stdout.write(f"{path}\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pneumoscope.report.compare import compare_runs

    df = compare_runs(args.runs, args.out, split=args.split)
    sys.stdout.write(df.to_markdown(index=False, floatfmt=".4f") + "\n")
    if args.paired:
        from pneumoscope.report.paired import paired_comparison

        if len(args.runs) != 2:
            raise PneumoscopeError(f"--paired compares exactly two runs, got {len(args.runs)}")
        paired_comparison(args.runs[0], args.runs[1], args.out, split=args.split, n_boot=args.bootstrap)
        sys.stdout.write(Path(args.out, "paired.md").read_text())
    return 0


def cmd_gan(args: argparse.Namespace) -> int:
    from pneumoscope.data.paths import resolve_data_root

    if args.gan_command == "train":
        from pneumoscope.gan.train import train_gan

        from pneumoscope.config import apply_overrides

        keys = ("size", "epochs", "batch_size", "seed", "width", "z_dim", "lr_g", "lr_d", "val_fraction", "threads")
        config = apply_overrides({k: getattr(args, k) for k in keys if getattr(args, k) is not None}, args.set or [])
        root = resolve_data_root(args.data) if (args.data or not args.resume) else None
        row = train_gan(root, args.out, config=config, resume=args.resume, progress=_progress(args))
        log.info("GAN %s: epoch %s, discriminator class accuracy on val %s", args.out, row.get("epoch"),
                 row.get("val_class_accuracy"))
    elif args.gan_command == "sample":
        from pneumoscope.gan.sample import sample_command

        sample_command(args.gan_dir, args.cls, args.n, args.out, seed=args.seed)
        sys.stdout.write(f"{Path(args.out, 'samples.csv')}\n")
    else:
        from pneumoscope.gan.evaluate import evaluate_gan

        res = evaluate_gan(args.gan_dir, resolve_data_root(args.data) if args.data else None,
                           classifier=args.classifier, out=args.out, n_synthetic=args.n, bootstrap=args.bootstrap,
                           include_test=not args.no_test, progress=_progress(args))
        sys.stdout.write(Path(res["out_dir"], "gan_eval.md").read_text())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pneumoscope.predict import predict_command

    from pneumoscope.bundle import resolve_model

    return predict_command(resolve_model(args.model), args.inputs, out=args.out, batch_size=args.batch_size, cam=args.cam,
                           tta=args.tta, progress=_progress(args))


def cmd_export(args: argparse.Namespace) -> int:
    from pneumoscope.export import export_command

    return export_command(args.run, args.out, opset=args.opset, check=args.check, include_weights=not args.no_weights)


def cmd_serve(args: argparse.Namespace) -> int:
    from pneumoscope.serve.app import serve_command

    from pneumoscope.bundle import resolve_model

    return serve_command(resolve_model(args.model), host=args.host, port=args.port, max_upload_bytes=args.max_upload_bytes,
                         cors_origins=args.cors_origin)


def cmd_explain(args: argparse.Namespace) -> int:
    from pneumoscope.explain.command import explain_command

    return explain_command(args.run, args.images, args.out, method=args.method, target=args.target)


def cmd_ensemble(args: argparse.Namespace) -> int:
    from pneumoscope.ensemble import ensemble_command

    return ensemble_command(args.runs, args.out, rule=args.rule, cache_dir=args.cache_dir, progress=_progress(args))


def cmd_sweep(args: argparse.Namespace) -> int:
    from pneumoscope.sweep import sweep_command

    return sweep_command(args.file, data=args.data, out=args.out, reduced=args.reduced, dry_run=args.dry_run,
                         only=args.only, progress=_progress(args))


def cmd_bundle(args: argparse.Namespace) -> int:
    from pneumoscope.bundle import package_model

    out = package_model(args.run, args.out, split=args.split)
    sys.stdout.write(f"{out}\n")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pneumoscope.models import get_card, list_models

    for name in list_models(args.pattern):
        card = get_card(name)
        sources = ", ".join(w.kind + ":" + w.ident for w in card.weights) or "none (trained from scratch)"
        sys.stdout.write(f"{name:22s} {card.family:18s} {card.input_size:4d}px  weights: {sources}\n")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from pneumoscope.config import builtin_configs

    sys.stdout.write("\n".join(builtin_configs()) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscope", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pneumoscope {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    chk = data.add_parser("check", help="scan a dataset: counts, corrupt files, duplicates, patient overlap")
    _data_arg(chk, positional=True)
    chk.add_argument("--data", dest="data_opt", default=None, help="same as the positional DATA")
    chk.add_argument("--out", default="out/data_check", help="folder for JSON, Markdown and PNG figures")
    chk.add_argument("--manifest", default=None, help="where to save the manifest (.parquet or .csv)")
    chk.add_argument("--val-fraction", type=float, default=0.15)
    chk.add_argument("--split", choices=("random", "ordered"), default="random",
                     help="validation split method (see data.split in the config reference)")
    chk.add_argument("--val-source", default=None, metavar="PATH",
                     help="validate on this other labelled folder or CSV instead of a split cut from train "
                          "(data.val_source)")
    chk.add_argument("--seed", type=int, default=0)
    chk.set_defaults(func=cmd_data_check)

    tr = sub.add_parser("train", help="train a model from a config")
    tr.add_argument("--config", default="default", help="built-in config name or YAML path")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    tr.add_argument("--out", default=None, help="run directory (default runs/<name>-<time>)")
    tr.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed or finished run")
    tr.add_argument("--no-progress", action="store_true")
    _data_arg(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a trained model on a labelled split (default: test)")
    ev.add_argument("run", help="run directory, checkpoint directory or exported model")
    _data_arg(ev)
    ev.add_argument("--split", default="test", help="test | val | train | all (default test)")
    ev.add_argument("--out", default=None,
                    help="output folder (default RUN/eval/SPLIT; out/eval/default/SPLIT for the bundled model)")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (patients)")
    ev.add_argument("--tta", type=int, default=8, help="test-time augmentation samples for uncertainty (0: off)")
    ev.add_argument("--refer-fraction", type=float, default=0.1,
                    help="fraction of validation cases flagged 'refer' (sets the uncertainty cut-off)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    rn = sub.add_parser("run", help="the main job: data check, train, evaluate on test, report")
    _data_arg(rn)
    rn.add_argument("--out", default="out", help="output folder")
    rn.add_argument("--config", default="default")
    rn.add_argument("--set", action="append", metavar="KEY=VALUE")
    rn.add_argument("--no-progress", action="store_true")
    rn.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="one self-contained HTML report for a run")
    rp.add_argument("run")
    rp.add_argument("--out", default=None, help="HTML path (default RUN/report.html)")
    rp.add_argument("--data-check", default=None, help="data check folder to include")
    rp.set_defaults(func=cmd_report)

    cp = sub.add_parser("compare", help="compare evaluated runs (table + overlaid ROC curves)")
    cp.add_argument("runs", nargs="+")
    cp.add_argument("--out", default="out/compare")
    cp.add_argument("--split", default="test")
    cp.add_argument("--paired", action="store_true",
                    help="two runs: differences A-B with paired patient-bootstrap CIs (paired.md)")
    cp.add_argument("--bootstrap", type=int, default=2000, help="resamples for --paired")
    cp.set_defaults(func=cmd_compare)

    gan = sub.add_parser("gan", help="ACGAN: train, sample synthetic X-rays, evaluate").add_subparsers(
        dest="gan_command", required=True)
    gt = gan.add_parser("train", help="train an ACGAN on the train split (normal/bacterial/viral)")
    _data_arg(gt)
    gt.add_argument("--out", required=True, help="GAN directory")
    gt.add_argument("--resume", action="store_true", help="continue the run in --out (e.g. with more --epochs)")
    gt.add_argument("--epochs", type=int, default=None, help="total epochs (default 20)")
    gt.add_argument("--size", type=int, default=None, help="image size, power of two (default 64)")
    gt.add_argument("--batch-size", type=int, default=None, help="default 64")
    gt.add_argument("--width", type=int, default=None, help="base channel width (default 32)")
    gt.add_argument("--z-dim", type=int, default=None)
    gt.add_argument("--lr-g", type=float, default=None)
    gt.add_argument("--lr-d", type=float, default=None)
    gt.add_argument("--val-fraction", type=float, default=None)
    gt.add_argument("--seed", type=int, default=None)
    gt.add_argument("--threads", type=int, default=None)
    gt.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="any other GAN setting (repeatable): loss=bce|hinge, mode_seeking=0.5, minibatch_std=false, "
                         "beta1, beta2, d_fake_class_weight, limit_per_class, grid_per_class")
    gt.add_argument("--no-progress", action="store_true")
    gs = gan.add_parser("sample", help="write synthetic images of a class as PNG + samples.csv")
    gs.add_argument("gan_dir")
    gs.add_argument("--class", dest="cls", required=True, help="normal | bacterial | viral | all")
    gs.add_argument("-n", type=int, default=100, help="images per class")
    gs.add_argument("--out", required=True)
    gs.add_argument("--seed", type=int, default=0)
    ge = gan.add_parser("evaluate", help="discriminator as a 3-class classifier; Fréchet distance; sample grid")
    ge.add_argument("gan_dir")
    _data_arg(ge)
    ge.add_argument("--classifier", default=None, help="trained run whose penultimate features define the distance")
    ge.add_argument("--out", default=None, help="default GAN_DIR/eval")
    ge.add_argument("-n", type=int, default=None, help="synthetic images per class (default: as many as val has)")
    ge.add_argument("--bootstrap", type=int, default=1000)
    ge.add_argument("--no-test", action="store_true", help="skip the official test split")
    ge.add_argument("--no-progress", action="store_true")
    gan_parsers = (gt, gs, ge)
    for p in gan_parsers:
        p.set_defaults(func=cmd_gan)

    pr = sub.add_parser("predict", help="predict on X-ray files, folders or a CSV (JPEG/PNG/DICOM)")
    pr.add_argument("inputs", nargs="+", help="files, folders (recursive) or a CSV with a 'path' column")
    pr.add_argument("--model", default=None, help="run, checkpoint or exported model (default: the bundled model)")
    pr.add_argument("--out", default=None, help="CSV/JSON path or folder for predictions")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--cam", action="store_true", help="also write Grad-CAM overlays")
    pr.add_argument("--tta", type=int, default=0, help="test-time augmentation samples (uncertainty)")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export a model to ONNX with a parity check against PyTorch")
    ex.add_argument("run")
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--check", nargs="*", default=None, help="images for the parity check (default: 16 from the dataset)")
    ex.add_argument("--no-weights", action="store_true", help="do not copy the safetensors weights beside the ONNX file")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="REST API + web page (FastAPI/uvicorn)")
    sv.add_argument("model", nargs="?", default=None, help="run, checkpoint or exported model (default: bundled)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-upload-bytes", type=int, default=20_000_000)
    sv.add_argument("--cors-origin", action="append", default=None, help="allowed CORS origin (off by default)")
    sv.set_defaults(func=cmd_serve)

    xp = sub.add_parser("explain", help="Grad-CAM overlays (image, heatmap, blend) as PNG")
    xp.add_argument("run", help="run, checkpoint or model directory")
    xp.add_argument("images", nargs="+")
    xp.add_argument("--out", default="out/explain")
    xp.add_argument("--method", default="gradcam", help="gradcam | gradcam++ | xgradcam | eigencam | layercam")
    xp.add_argument("--target", default=None, help="class name to explain (default: the predicted class)")
    xp.set_defaults(func=cmd_explain)

    en = sub.add_parser("ensemble", help="combine finished runs into one model (mean of calibrated probabilities)")
    en.add_argument("runs", nargs="+", help="run directories sharing task, classes, preprocessing and validation split")
    en.add_argument("--out", required=True, help="ensemble directory (usable wherever a run or model is)")
    en.add_argument("--rule", choices=["mean", "val_weighted"], default="mean",
                    help="plain mean, or weights proportional to each member's validation AUROC - 0.5")
    en.add_argument("--cache-dir", default=None, help="image cache holding the validation images (default: the runs')")
    en.add_argument("--no-progress", action="store_true")
    en.set_defaults(func=cmd_ensemble)

    sw = sub.add_parser("sweep", help="run a grid/list of config overrides (resumable) and tabulate the results")
    sw.add_argument("file", help="sweep YAML (e.g. experiments/roadmap.yaml)")
    _data_arg(sw)
    sw.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<file name>[-reduced])")
    sw.add_argument("--reduced", action="store_true", help="apply the file's reduced: section (a quick CPU version)")
    sw.add_argument("--dry-run", action="store_true", help="print the plan and an estimated time; train nothing")
    sw.add_argument("--only", action="append", default=None, metavar="EXPERIMENT", help="run only these experiments")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(func=cmd_sweep)

    bd = sub.add_parser("bundle", help="package a trained, test-evaluated run as the built-in fp16 model")
    bd.add_argument("run")
    bd.add_argument("--out", default=None, help="default: the package's weights/default folder")
    bd.add_argument("--split", default="test", help="whose metrics go into the card")
    bd.set_defaults(func=cmd_bundle)

    md = sub.add_parser("models", help="list registered models")
    md.add_argument("pattern", nargs="?", default="*")
    md.set_defaults(func=cmd_models)

    cf = sub.add_parser("configs", help="list built-in configs")
    cf.set_defaults(func=cmd_configs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    if args.func not in (cmd_serve, cmd_models, cmd_configs):
        # batch work (PNEUMOSCOPE_MALLOC=default switches it off): keep freed activations in the
        # heap instead of re-faulting them every batch (about 2x faster CNN passes on CPU; see
        # pneumoscope.utils.memory). The server never tunes, for its small steady footprint.
        from pneumoscope.utils.memory import tune_malloc

        tune_malloc()
    try:
        return int(args.func(args) or 0)
    except PneumoscopeError as err:
        sys.stderr.write(f"pneumoscope: error: {err}\n")
        return 2
    except OSError as err:  # the environment, not the code: an unwritable --out, a vanished folder
        where = f"{err.filename}: " if err.filename else ""
        sys.stderr.write(f"pneumoscope: error: {where}{err.strerror or err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("pneumoscope: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
