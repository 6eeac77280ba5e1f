"""Job configs: argparse generated from them, validated once, and flags that would do nothing refused."""
from __future__ import annotations

from dataclasses import fields

import pytest

from toolchain.cli import build_parser, main
from toolchain.errors import ConfigError
from toolchain.jobs.config import ExportConfig, PruneConfig, QuantConfig, compress_validate
from toolchain.jobs.options import config_from_args

PRUNE = ["prune", "--model", "smollm2", "--out", "unused"]
QUANT = ["quantize", "--model", "smollm2", "--out", "unused"]
COMPRESS = ["compress", "--model", "smollm2", "--out", "unused"]
EXPORT = ["export", "--model", "unused-in", "--out", "unused"]


@pytest.mark.parametrize("argv,flag", [
    (PRUNE + ["--method", "wanda", "--sparsity", "0.5", "--rebuild-ratio", "0.1"], "--rebuild-ratio"),
    (PRUNE + ["--method", "wanda", "--sparsity", "0.5", "--rebuild-ratio", "0.01"], "--rebuild-ratio"),
    (PRUNE + ["--method", "sparsegpt", "--sparsity", "0.5", "--no-loss-guard"], "--loss-guard"),
    (PRUNE + ["--method", "wanda", "--sparsity", "0.5", "--rebuild-score", "grad-rms"], "--rebuild-score"),
    (PRUNE + ["--method", "barber", "--sparsity", "0.5", "--no-keep-updates"], "--keep-updates"),
    (PRUNE + ["--method", "barber", "--init", "wanda", "--sparsity", "0.5", "--rebuild-solver", "obs"],
     "--rebuild-solver"),
    (PRUNE + ["--method", "wanda", "--sparsity", "0.5", "--reconstruct-epochs", "2"], "--reconstruct-epochs"),
    (PRUNE + ["--method", "magnitude", "--sparsity", "0.5", "--calib-samples", "4"], "--calib-samples"),
    (QUANT + ["--method", "rtn", "--bits", "4", "--act-order"], "--act-order"),
    (QUANT + ["--method", "rtn", "--bits", "4", "--seqlen", "64"], "--seqlen"),
    (QUANT + ["--method", "aptq", "--bits", "4", "--sensitivity", "local"], "--sensitivity"),
    (QUANT + ["--method", "aptq", "--bits", "3.5", "--sensitivity", "local", "--hutchinson-samples", "2"],
     "--hutchinson-samples"),
    (COMPRESS + ["--prune", "wanda", "--quant", "gptq", "--bits", "4", "--sparsity", "0.5", "--rebuild-ratio", "0.1"],
     "--rebuild-ratio"),
    (COMPRESS + ["--prune", "magnitude", "--quant", "rtn", "--bits", "4", "--sparsity", "2:4", "--seed", "1"],
     "--seed"),
    (EXPORT + ["--target", "onnx", "--no-synth"], "--no-synth"),
    (EXPORT + ["--target", "fpga", "--precision", "int8"], "--precision"),
    (EXPORT + ["--target", "all", "--max-seq", "512"], "--max-seq"),
    (EXPORT + ["--target", "blob", "--onnx-weights", "qdq"], "--onnx-weights"),
])
def test_a_flag_without_effect_is_refused_by_name(argv, flag, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag} has no effect here" in err, err


@pytest.mark.parametrize("argv", [
    PRUNE + ["--method", "barber", "--init", "sparsegpt", "--sparsity", "0.5", "--rebuild-solver", "obs",
             "--no-keep-updates", "--rebuild-ratio", "0.1"],
    PRUNE + ["--method", "magnitude", "--sparsity", "0.5", "--allocation", "owl", "--calib-samples", "4"],
    PRUNE + ["--method", "wanda", "--sparsity", "0.5", "--reconstruct", "block", "--reconstruct-lr", "0.01"],
    QUANT + ["--method", "aptq", "--bits", "3.5", "--sensitivity", "model", "--hutchinson-samples", "2"],
    COMPRESS + ["--prune", "magnitude", "--quant", "gptq", "--bits", "4", "--sparsity", "2:4", "--seed", "1"],
])
def test_flags_that_take_effect_are_accepted(argv):
    args = build_parser().parse_args(argv)
    if args.command == "compress":
        p, pg = config_from_args(PruneConfig, args, method=args.prune_method)
        q, qg = config_from_args(QuantConfig, args, method=args.quant_method)
        compress_validate(p, q, pg | qg)
    else:
        cls = PruneConfig if args.command == "prune" else QuantConfig
        cfg, given = config_from_args(cls, args)
        cfg.validate(given)


def test_parser_defaults_are_the_config_defaults():
    """argparse is generated from the configs: what the CLI builds with no optional flag equals the defaults."""
    args = build_parser().parse_args(PRUNE + ["--method", "wanda", "--sparsity", "0.5"])
    cfg, given = config_from_args(PruneConfig, args)
    assert cfg == PruneConfig(method="wanda", sparsity="0.5") and given == {"method", "sparsity"}
    args = build_parser().parse_args(QUANT + ["--method", "gptq", "--bits", "4"])
    assert config_from_args(QuantConfig, args)[0] == QuantConfig(method="gptq", bits="4")


def test_every_flagged_field_has_help():
    for cls in (PruneConfig, QuantConfig, ExportConfig):
        for f in fields(cls):
            opt = f.metadata.get("option")
            assert opt is None or opt.help.strip(), f.name
    text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "--rebuild-ratio" in text and "(default 0.01)" in text


def test_python_api_validates_values_but_not_presence():
    """The Python API cannot tell a default from a given value, so only bad values are refused there."""
    PruneConfig(method="wanda", sparsity="0.5", rebuild_ratio=0.3).validate()
    with pytest.raises(ConfigError, match="--rebuild-ratio must be in"):
        PruneConfig(method="barber", sparsity="0.5", rebuild_ratio=3).validate()
    with pytest.raises(ConfigError, match="--dataset and --text-file"):
        PruneConfig(method="wanda", sparsity="0.5", dataset="pydoc", text_file="x.txt").validate()
