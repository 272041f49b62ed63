"""The one ``hsfm`` entry point.

    hsfm shards build INPUT... --out DIR [--synthetic N ...]   scenes -> WebDataset shards + index.json
    hsfm shards inspect DIR|SHARD.tar [--verify]              summarise (and check) shards
    hsfm STAGE [group=option] [key=value ...]                  a registered stage (pretrain, probe, ...), Hydra overrides
    hsfm export RUN_DIR|CHECKPOINT_DIR --out DIR                safetensors + config.json for downstream use
    hsfm eval-recon MODEL --shards DIR                          PSNR / SSIM / spectral angle of masked reconstructions

Errors that name bad input are printed as one line (set HSFM_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from hsfm_train.errors import HsfmError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (HsfmError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("HSFM_DEBUG"):
            raise
        print(f"hsfm: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsfm", description="Hyperspectral / optical-SAR foundation-model training")
    commands = parser.add_subparsers(metavar="COMMAND")

    shards = commands.add_parser("shards", help="build and inspect WebDataset shards").add_subparsers(metavar="ACTION")
    build = shards.add_parser("build", help="tile scenes into WebDataset shards with an index",
                              description="Tile scene files (npz, mat, ENVI .hdr, GeoTIFF, PNG pairs) and/or "
                                          "synthetic linear-mixing scenes into shards; see shards/README.md.")
    build.add_argument("inputs", nargs="*", type=Path, help="scene files (read with default options)")
    build.add_argument("--manifest", type=Path,
                       help="YAML/JSON list of {path: ..., <reader option>: ...} for inputs that need options "
                            "(ground_truth, labels, header, key, bands, sensor, wavelengths_nm, ...)")
    build.add_argument("--out", required=True, type=Path, help="output directory")
    build.add_argument("--name", default="shard", help="shard file prefix (default: shard)")
    build.add_argument("--tile-size", type=int, default=32)
    build.add_argument("--stride", type=int, default=None, help="default: tile size (no overlap)")
    build.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="tile dtype on disk")
    build.add_argument("--max-samples-per-shard", type=int, default=256)
    build.add_argument("--max-shard-mb", type=float, default=256.0)
    build.add_argument("--max-nodata-fraction", type=float, default=0.5)
    build.add_argument("--nodata-value", type=float, default=None, help="a value that marks nodata in every band")
    build.add_argument("--sensor", default=None, help="sensor name for the positional inputs")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true", help="rebuild over an existing index")
    build.add_argument("--quiet", action="store_true")
    build.add_argument("--split", choices=("all", "held_out", "train"), default="all",
                       help="keep only this split's scenes, by source image (hsfm_train/data/pairs.py)")
    build.add_argument("--held-out-fraction", type=float, default=0.2, help="the held-out share of source images")
    build.add_argument("--unpair-fraction", type=float, default=0.0,
                       help="this share of source images loses its paired (SAR) image: unpaired samples in the stream")
    synthetic = build.add_argument_group("synthetic linear-mixing scenes from real library spectra")
    synthetic.add_argument("--synthetic", type=int, default=0, metavar="N", help="add N synthetic scenes")
    synthetic.add_argument("--synthetic-size", type=int, default=64, help="height and width")
    synthetic.add_argument("--synthetic-grid", default="aviris224", help="band grid: a synthetic.SENSOR_GRIDS name or a sensor preset (docs/sensors.md)")
    synthetic.add_argument("--synthetic-endmembers", type=int, default=4)
    synthetic.add_argument("--synthetic-snr", type=float, default=30.0, help="dB")
    synthetic.add_argument("--synthetic-abundances", choices=("gaussian_field", "urban"), default="gaussian_field")
    build.set_defaults(handler=_build)

    inspect = shards.add_parser("inspect", help="summarise a shard directory or one .tar shard")
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--verify", action="store_true", help="read every shard: counts, checksums, decoding")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(handler=_inspect)

    from hsfm_train.stages.base import stages

    for name, stage in stages().items():
        command = commands.add_parser(name, help=stage.help,
                                      description=f"{stage.help}. Composes configs/{name}.yaml with Hydra overrides "
                                                  "(group=option or dotted.key=value); a rerun with the same "
                                                  "output_dir resumes or is refused while another run holds it.")
        command.add_argument("overrides", nargs="*", help="Hydra overrides: group=option or dotted.key=value")
        command.add_argument("--print-config", action="store_true", help="print the composed config and exit")
        command.set_defaults(handler=_stage, stage=stage)

    export = commands.add_parser("export", help="export a run or checkpoint as model.safetensors + config.json")
    export.add_argument("source", type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory")
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--encoder-only", action="store_true", help="leave out the decoder and the LSMM head")
    export.set_defaults(handler=_export)

    evaluate = commands.add_parser("eval-recon", help="masked-reconstruction PSNR / SSIM / spectral angle")
    evaluate.add_argument("model", type=Path, help="an export directory, a run directory or a checkpoint directory")
    evaluate.add_argument("--shards", required=True, type=Path, help="shard directory with index.json")
    evaluate.add_argument("--mask-ratio", type=float, default=0.75)
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-batches", type=int, default=None)
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.add_argument("--no-baselines", action="store_true",
                          help="skip the nearest-visible-pixel and visible-mean baselines")
    evaluate.set_defaults(handler=_eval_recon)
    return parser


def _stage(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    config = args.stage.load_config(args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(config)))
        return 0
    stage = args.stage(config)
    summary = stage.execute()
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per job, not one per process
        print(stage.format_summary(summary))
    return 0


def _export(args: argparse.Namespace) -> int:
    from hsfm_train.engine.export import export_model, load_checkpoint_model

    model = load_checkpoint_model(args.source)
    metadata = model.export_config
    path = export_model(model, args.out, encoder_only=args.encoder_only,
                        normalization=metadata.get("normalization"), provenance=metadata.get("provenance"))
    print(f"exported {metadata['checkpoint']} -> {path} ({'encoder only' if args.encoder_only else 'full model'})")
    return 0


def _eval_recon(args: argparse.Namespace) -> int:
    from hsfm_train.engine.export import load_pretrained
    from hsfm_train.stages.eval_recon import EvalConfig, eval_loader, evaluate_reconstruction, format_comparison

    model = load_pretrained(args.model)  # an export, a run or a checkpoint directory
    config = EvalConfig(mask_ratio=args.mask_ratio, seed=args.seed, max_batches=args.max_batches)
    results = evaluate_reconstruction(model, eval_loader(str(args.shards), args.batch_size), config,
                                      baselines=not args.no_baselines)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{args.model} on {args.shards}: {results['images']} tiles, mask ratio {args.mask_ratio}")
        print("\n".join(format_comparison(results)))
    return 0


def _scene_sources(args: argparse.Namespace) -> Iterator[Any]:
    from hsfm_train.data.readers import read_scenes

    for path in args.inputs:
        yield from read_scenes(path, sensor=args.sensor)
    if args.manifest:
        for entry in _load_manifest(args.manifest):
            options = dict(entry)
            yield from read_scenes(Path(options.pop("path")), **options)
    if args.synthetic:
        from hsfm_train.data.sensors import preset_names
        from hsfm_train.data.synthetic import SENSOR_GRIDS, SyntheticSceneConfig, generate_scenes

        grids = sorted([*SENSOR_GRIDS, *preset_names()])
        if args.synthetic_grid not in grids:
            raise HsfmError(f"--synthetic-grid {args.synthetic_grid!r} is unknown; choose from {grids}")
        config = SyntheticSceneConfig(
            height=args.synthetic_size,
            width=args.synthetic_size,
            num_endmembers=args.synthetic_endmembers,
            snr_db=args.synthetic_snr,
            abundance_source=args.synthetic_abundances,
            target_wavelengths_nm=args.synthetic_grid,
            sensor=f"synthetic_{args.synthetic_grid}",
        )
        yield from generate_scenes(config, args.synthetic, seed=args.seed)


def _load_manifest(path: Path) -> list[dict[str, Any]]:
    import yaml

    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist")
    entries = yaml.safe_load(path.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise HsfmError(f"manifest {path} must be a list of mappings, each with a 'path'")
    for entry in entries:  # relative paths are relative to the manifest
        entry["path"] = str((path.parent / entry["path"]) if not Path(entry["path"]).is_absolute() else entry["path"])
        for option in ("ground_truth", "header", "labels"):
            if isinstance(entry.get(option), str) and not Path(entry[option]).is_absolute():
                entry[option] = str(path.parent / entry[option])
    return entries


def _build(args: argparse.Namespace) -> int:
    from hsfm_train.data.shards import ShardBuildConfig, build_shards
    from hsfm_train.data.tiling import TilingConfig

    if not args.inputs and not args.manifest and not args.synthetic:
        raise HsfmError("nothing to build: give scene files, --manifest or --synthetic N")
    for path in [*args.inputs, *([args.manifest] if args.manifest else [])]:
        if not path.exists():  # fail before any shard is written
            raise FileNotFoundError(f"input {path} does not exist")
    config = ShardBuildConfig(
        output_dir=str(args.out),
        name=args.name,
        tiling=TilingConfig(args.tile_size, args.stride, args.max_nodata_fraction, args.nodata_value),
        dtype=args.dtype,
        max_samples_per_shard=args.max_samples_per_shard,
        max_shard_bytes=int(args.max_shard_mb * 2**20),
        seed=args.seed,
        overwrite=args.overwrite,
    )
    from hsfm_train.data.pairs import split_scenes

    if not 0.0 < args.held_out_fraction < 1.0 or not 0.0 <= args.unpair_fraction <= 1.0:
        raise HsfmError("--held-out-fraction must be in (0, 1) and --unpair-fraction in [0, 1]")
    scenes = split_scenes(_scene_sources(args), args.split, args.held_out_fraction, args.unpair_fraction)
    index = build_shards(scenes, config, progress=not args.quiet)
    print(_format_summary(index))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from hsfm_train.data.shards import check_shard_files, load_index, summarise_tar, verify_shards

    if args.path.is_file() and args.path.suffix == ".tar":
        summary = summarise_tar(args.path)
        print(json.dumps(summary, indent=1) if args.json else _format_tar_summary(summary))
        return 1 if summary["problems"] else 0
    index = load_index(args.path)  # refuses entries naming anything but a file in this folder
    report = verify_shards(index) if args.verify else None
    # Without --verify, still catch missing or truncated shards: a stat per shard against the index's sizes.
    files = None if args.verify else {"shards": len(index["shards"]), "problems": check_shard_files(index)}
    if args.json:
        print(json.dumps({"index": {k: v for k, v in index.items() if k != "shards"}, "verify": report,
                          "files": files}, indent=1))
    else:
        print(_format_summary(index))
        if report is not None:
            print(f"verify: {report['samples']} samples in {report['shards']} shards read back; "
                  f"{len(report['problems'])} problem(s)")
        else:
            print(f"files: {files['shards']} shards checked for presence and size (--verify reads them); "
                  f"{len(files['problems'])} problem(s)")
        for problem in (report or files)["problems"][:20]:
            print(f"  - {problem}")
    return 1 if (report or files)["problems"] else 0


def _format_summary(index: dict[str, Any]) -> str:
    total_bytes = sum(record["bytes"] for record in index["shards"])
    build = index.get("build", {})
    lines = [
        f"{index.get('root', '')}: {index['total_samples']} samples in {len(index['shards'])} shards "
        f"({total_bytes / 2**20:.1f} MiB), tile {build.get('tile_size')} stride {build.get('stride')} "
        f"{build.get('dtype')}, {len(index.get('scenes', []))} scenes",
        "band sets:",
    ]
    for name, info in index["band_sets"].items():
        wavelengths = info.get("wavelengths_nm")
        span = f"{wavelengths[0]:.1f}-{wavelengths[-1]:.1f} nm" if wavelengths else "wavelengths unknown"
        lines.append(f"  {name}: {info['samples']} samples, {info['bands']} bands, {span}")
    if index.get("dropped"):
        lines.append(f"dropped tiles: {index['dropped']}")
    return "\n".join(lines)


def _format_tar_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['path']}: {summary['samples']} samples; members {summary['members']}"]
    if summary.get("first_meta"):
        lines.append(f"first sample meta: {json.dumps(summary['first_meta'], sort_keys=True)}")
    lines += [f"  - {problem}" for problem in summary["problems"][:20]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
