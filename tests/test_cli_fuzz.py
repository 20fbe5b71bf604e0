"""Fuzz the command line: random and malformed flag values and files never give a traceback,
exit 0 (it ran) or 2 (a one-line error), and leave no files behind."""

import string

from conftest import invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NUMERIC_FLAGS = [
    "--sparsity_ratio",
    "--nsamples",
    "--seqlen",
    "--seed",
    "--batch_size",
    "--eval_batch_size",
    "--eval_limit",
    "--neuronrank_max_classes",
    "--tau_percentile",
    "--top_quantile",
    "--idf_clip",
    "--spiky_clip",
    "--inverse_wanda_update_fraction",
]
TEXT_FLAGS = {
    "--sparsity_type": ["unstructured", "2:4", "neuron", "4:8", "3:2", "a:b", ":", "0:0", "1:"],
    "--prune_method": ["wanda", "magnitude", "wanda_idf", "nope", ""],
    "--scope": ["row", "layer", "column"],
    "--dtype": ["float32", "bfloat16", "int8", "fp4"],
    "--device": ["cpu", "mps", "cuda:9", "meta", "gpu", "cpu:0"],
    "--window_bos": ["auto", "always", "never", "yes"],
    "--recovery": ["inverse_wanda", "least_squares", "magic"],
}
NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["0", "1", "-1", "0.5", "1e309", "nan", "", "1,2", "0x10"]),
)
JUNK = st.text(string.printable, max_size=12)
FILES = ["binary", "empty", "folder", "missing", "text", "nul"]


def _odd_files(root):
    (root / "binary").write_bytes(bytes(range(256)))
    (root / "empty").write_text("")
    (root / "folder").mkdir()
    (root / "nul").write_bytes(b"w1 w2\x00 w3")
    return {name: root / name for name in FILES}


flag_values = st.one_of(
    st.tuples(st.sampled_from(NUMERIC_FLAGS), NUMBERS),
    st.tuples(
        st.sampled_from(sorted(TEXT_FLAGS)),
        st.one_of(st.sampled_from([v for vs in TEXT_FLAGS.values() for v in vs]), JUNK),
    ),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    flags=st.lists(flag_values, min_size=1, max_size=3),
    dataset=st.sampled_from(FILES),
    output=st.sampled_from(["--save_json", "--save_model", "--save_log", None]),
    command=st.sampled_from(["prune", "eval"]),
)
def test_cli_never_shows_a_traceback(
    tmp_path_factory, tiny_model_dir, text_dir, flags, dataset, output, command
):
    root = tmp_path_factory.mktemp("fuzz")
    files = _odd_files(root)
    files["text"] = text_dir / "train.txt"
    args = [command, "--model", tiny_model_dir, "--dataset", files[dataset], "--quiet"]
    args += ["--seqlen", "16", "--nsamples", "2", "--eval_limit", "1"]
    if command == "eval":
        flags = [
            (f, v)
            for f, v in flags
            if f
            in (
                "--seqlen",
                "--eval_limit",
                "--device",
                "--dtype",
                "--window_bos",
                "--eval_batch_size",
            )
        ]
    for flag, value in flags:
        args += [flag, value]
    # outputs go under a file, so they must be refused: nothing may appear
    if output and command == "prune":
        args += [output, files["binary"] / "out"]
    before = set(root.rglob("*"))
    result = invoke(*args)
    assert result.exit_code in (0, 2), (args, result.output, result.exception)
    assert "Traceback" not in result.output
    assert set(root.rglob("*")) == before


@settings(max_examples=15, deadline=None)
@given(command=st.sampled_from(["prune", "eval", "compare"]), junk=st.lists(JUNK, max_size=3))
def test_help_and_unknown_arguments_never_crash(command, junk):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output
    result = invoke(command, *junk, "--no_such_flag")
    assert result.exit_code == 2 and "Traceback" not in result.output
