"""Fuzz the command line: random and malformed flag values and files never give a traceback,
exit 0 (it ran) or 2 (a one-line error), and leave no files behind."""

import json
import string
import subprocess

import pytest
from conftest import invoke, make_model, make_tokenizer
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


FIELD_VALUES = st.one_of(
    st.text(max_size=8),
    st.none(),
    st.integers(),
    st.just(""),
    st.just("   "),
    st.lists(st.text(max_size=3), max_size=2),
)


@st.composite
def prompt_files(draw) -> tuple[str, str]:
    """A .jsonl or .csv prompt/response file, more often malformed than not."""
    rows = draw(
        st.lists(
            st.dictionaries(st.sampled_from(["prompt", "response", "other"]), FIELD_VALUES),
            max_size=4,
        )
    )
    if draw(st.booleans()):
        lines = [json.dumps(row) for row in rows] + draw(st.lists(JUNK, max_size=1))
        return ".jsonl", "\n".join(lines)
    header = draw(st.sampled_from(["prompt,response", "prompt", "response,prompt", "a,b", ""]))
    body = [",".join(str(v) for v in row.values()) for row in rows]
    body += draw(st.lists(st.sampled_from(['"open', 'a,"b"c', "x,y,z", ""]), max_size=2))
    return ".csv", "\n".join([header, *body])


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=prompt_files(), method=st.sampled_from(["wanda", "wandg"]))
def test_malformed_prompt_files_are_one_line_errors(
    tmp_path_factory, tiny_model_dir, text_dir, data, method
):
    root = tmp_path_factory.mktemp("prompts")
    suffix, content = data
    path = root / f"pairs{suffix}"
    path.write_text(content)
    before = set(root.rglob("*"))
    result = invoke(
        "prune",
        "--model",
        tiny_model_dir,
        "--dataset",
        text_dir,
        "--prune_data",
        path,
        "--prune_method",
        method,
        "--seqlen",
        "16",
        "--nsamples",
        "2",
        "--eval_limit",
        "1",
        "--quiet",
        "--save_json",
        root / "r.json",
    )
    assert result.exit_code in (0, 2), (content, result.output, result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert set(root.rglob("*")) == before
        assert result.output.count("error:") == 1


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    where=st.integers(0, 10**6),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    offload=st.booleans(),
)
def test_non_finite_weights_are_refused(tmp_path_factory, text_dir, where, value, offload):
    root = tmp_path_factory.mktemp("nonfinite")
    model = make_model("llama")
    params = [p for name, p in model.named_parameters() if "layers" in name]
    flat = params[where % len(params)].data.view(-1)
    flat[where % flat.numel()] = value
    model.save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    args = ["prune", "--model", root / "model", "--dataset", text_dir, "--seqlen", "16"]
    args += ["--nsamples", "2", "--eval_limit", "1", "--quiet", "--save_model", root / "out"]
    result = invoke(*args, *(["--offload", "disk"] if offload else []))
    assert result.exit_code == 2 and "not finite" in result.output, result.output
    assert not any(p.name.startswith((".out", "out")) for p in root.iterdir())


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (root on Linux only; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("offload", [False, True])
def test_a_full_disk_is_one_line_and_keeps_the_results(
    tiny_disk, tiny_model_dir, text_dir, tmp_path, offload
):
    args = ["prune", "--model", tiny_model_dir, "--dataset", text_dir, "--seqlen", "16"]
    args += ["--nsamples", "2", "--eval_limit", "1", "--quiet", "--save_json", tmp_path / "r.json"]
    args += ["--save_model", tiny_disk / "out", *(["--offload", "disk"] if offload else [])]
    result = invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "No space left" in result.output or "disk" in result.output
    assert list(tiny_disk.iterdir()) == []  # no half-written model, no temporary
    if not offload:  # the in-memory run had finished: its result is kept
        assert (tmp_path / "r.json").exists()
