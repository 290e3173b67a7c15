"""The example scripts, run in-process on tiny configurations."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

np = pytest.importorskip("numpy")  # the examples need it; a machine without it skips them (no registry there)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
_data = importlib.import_module("_data")
train_3vs7 = importlib.import_module("train_3vs7")
two_layer_net = importlib.import_module("two_layer_net")
transfer_learning = importlib.import_module("transfer_learning")

N_COLS = 785
HEADER = "label," + ",".join(f"pixel{i}" for i in range(784))


def row(label: object, pixel: object = 0, n_cols: int = N_COLS) -> str:
    """One MNIST-format CSV line: ``label`` then ``n_cols - 1`` copies of ``pixel``."""
    return ",".join([str(label)] + [str(pixel)] * (n_cols - 1))


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 learnable 3s and 7s (sklearn digits, upsampled to 28x28, 0-255) plus
    20 rows of other digits, with a header, in MNIST CSV layout."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    lines = [HEADER]
    counts = dict.fromkeys(range(10), 0)
    quota = {3: 100, 7: 100, 0: 10, 1: 10}
    for image, label in zip(digits.images, digits.target, strict=True):
        if counts[label] >= quota.get(label, 0):
            continue
        counts[label] += 1
        big = np.pad(np.kron(image, np.ones((3, 3))), 2)  # 8x8 -> 24x24 -> 28x28
        pixels = np.rint(big * 255 / 16).astype(int).ravel()
        lines.append(f"{label}," + ",".join(map(str, pixels)))
    path = tmp_path_factory.mktemp("csv") / "digits.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def train(*argv: object) -> train_3vs7.Result:
    """Run train_3vs7 in-process with ``argv``."""
    return train_3vs7.train(train_3vs7.parse_args([str(a) for a in argv]))


# ------------------------------------------------------------------- CSV data


def test_load_mnist_csv_keeps_3_and_7(digits_csv: Path) -> None:
    x, y = _data.load_mnist_csv(digits_csv)
    assert x.shape == (200, 784) and x.dtype == torch.float32
    assert y.shape == (200, 1)
    assert x.min() >= 0.0 and x.max() == 1.0
    assert y.sum().item() == 100  # the 7s; 0s and 1s were skipped


def test_load_mnist_csv_without_header_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text(f"{row(7, 255)}\n\n{row(3, 51)}\n{row(5, 1)}\n\n")
    x, y = _data.load_mnist_csv(path)
    assert y.flatten().tolist() == [1.0, 0.0]
    assert x[0].eq(1.0).all() and torch.allclose(x[1], torch.full((784,), 0.2))


BAD_CSVS = {
    "short row": (
        [HEADER, row(3), row(7, n_cols=12)],
        3,
        "expected 785 columns, got 12",
    ),
    "long row": ([row(3), row(7, n_cols=786)], 2, "expected 785 columns, got 786"),
    "bad pixel": ([HEADER, row(3), row(7, "abc")], 3, "'abc' is not a number"),
    "nan pixel": ([row(3), row(7, "nan")], 2, "outside 0-255"),
    "big pixel": ([row(3), row(7), row(7, 256)], 3, "pixel 256 is outside 0-255"),
    "text label": (
        [HEADER, row(3), row("seven")],
        3,
        "label 'seven' is not a digit 0-9",
    ),
    "label 12": ([row(3), row(12)], 2, "label '12' is not a digit 0-9"),
    "label -1": ([row(7), row(3), row(-1)], 3, "label '-1' is not a digit 0-9"),
    "label 3.0": ([row(3), row("3.0")], 2, "label '3.0' is not a digit 0-9"),
    "empty file": ([], None, "no data rows"),
    "header only": ([HEADER], None, "no data rows"),
    "no 3 or 7": (
        [row(0), row(5), row(9)],
        None,
        "none of its 3 rows has label 3 or 7",
    ),
}


@pytest.mark.parametrize("case", BAD_CSVS)
def test_malformed_csv_is_one_error_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines, bad_row, message = BAD_CSVS[case]
    path = tmp_path / "bad.csv"
    path.write_text("".join(line + "\n" for line in lines))
    assert train_3vs7.main(["--csv", str(path), "--epochs", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1, err
    where = f"{path} row {bad_row}: " if bad_row else f"{path}: "
    assert err.startswith(f"error: {where}")
    assert message in err


def test_missing_csv_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.csv"
    assert train_3vs7.main(["--csv", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: file not found\n"


# ------------------------------------------------------------------- training


def test_train_on_csv_learns_and_matches_eager(digits_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = train("--csv", digits_csv, "--epochs", 3, "--batch-size", 16, "--lr", 3e-3)
    out = capsys.readouterr().out
    assert "160 train / 40 val rows, 784 features" in out
    assert out.count("epoch ") == 3
    assert "max |param diff| eager vs fastmlp" in out
    last = result.history[-1]
    assert last.val_acc["fastmlp"] > 0.8 and last.val_acc["eager"] > 0.8
    for stats in result.history:
        assert stats.loss["fastmlp"] == pytest.approx(stats.loss["eager"], rel=1e-5)
    assert result.max_param_diff < 1e-4
    # Adam hides a constant gradient scale; the trained models' logits do not.
    x, _ = _data.load_mnist_csv(digits_csv)
    with torch.no_grad():
        torch.testing.assert_close(result.models["fastmlp"](x), result.models["eager"](x), rtol=1e-4, atol=1e-4)
    assert isinstance(result.models["fastmlp"], train_3vs7.torch_fastmlp.Sequential)


def test_train_on_sklearn_digits_beats_chance() -> None:
    pytest.importorskip("sklearn")
    result = train("--epochs", 2)
    assert result.history[-1].val_acc["fastmlp"] > 0.8
    assert result.max_param_diff < 1e-4


def _checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same_state(a: object, b: object) -> None:
    """Nested dicts/lists of tensors and numbers are bitwise equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_resume_equals_uninterrupted_run(digits_csv: Path, tmp_path: Path) -> None:
    common = ("--csv", digits_csv, "--batch-size", 32)
    straight, first, resumed = (tmp_path / f"{n}.pt" for n in ("straight", "first", "resumed"))
    train(*common, "--epochs", 2, "--save", straight)
    train(*common, "--epochs", 1, "--save", first)
    result = train(*common, "--epochs", 2, "--resume", first, "--save", resumed)
    assert [s.epoch for s in result.history] == [2]
    a, b = _checkpoint(straight), _checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 2
    assert set(a) >= {"model_state_dict", "optimizer_state_dict", "generator_state"}
    _assert_same_state(a, b)
    # The first epoch alone really is a different state.
    assert not torch.equal(
        _checkpoint(first)["model_state_dict"]["0.weight"],
        a["model_state_dict"]["0.weight"],
    )


def test_resume_with_other_seed_is_refused(
    digits_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ck.pt"
    train("--csv", digits_csv, "--epochs", 1, "--save", ckpt)
    capsys.readouterr()
    argv = [
        "--csv",
        str(digits_csv),
        "--epochs",
        "2",
        "--resume",
        str(ckpt),
        "--seed",
        "1",
    ]
    assert train_3vs7.main(argv) == 2
    assert capsys.readouterr().err == f"error: {ckpt}: made with --seed 0, not 1\n"


def test_resume_from_garbage_is_one_error_line(
    digits_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "garbage.pt"
    ckpt.write_text("not a checkpoint")
    assert train_3vs7.main(["--csv", str(digits_csv), "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt}: cannot load checkpoint") and err.count("\n") == 1


def test_plot_writes_png(digits_csv: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "loss.png"
    train("--csv", digits_csv, "--epochs", 1, "--plot", png)
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert two_layer_net.main(["--device", "cuda", "--iters", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda: CUDA is not available")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_examples_on_cuda_match_eager(digits_csv: Path) -> None:
    result = train("--csv", digits_csv, "--epochs", 2, "--batch-size", 16, "--device", "cuda")
    assert result.max_param_diff < 1e-4
    assert result.history[-1].val_acc["fastmlp"] > 0.8
    args = two_layer_net.parse_args(["--iters", "30", "--log-every", "10", "--device", "cuda"])
    assert two_layer_net.run(args).max_param_diff < 1e-4


def test_progress_falls_back_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    items = [1, 2, 3]
    assert _data.progress(items, desc="x") is items


# ---------------------------------------------------------------- other demos


def test_two_layer_net_matches_eager(capsys: pytest.CaptureFixture[str]) -> None:
    args = two_layer_net.parse_args(["--iters", "30", "--log-every", "10"])
    result = two_layer_net.run(args)
    eager = result.losses["eager"]
    for name in ("fastmlp", "trainstep"):
        fast = result.losses[name]
        assert [it for it, _ in fast] == [it for it, _ in eager] == [10, 20, 30]
        assert fast[-1][1] < 0.5 * fast[0][1]  # it learns
        for (_, a), (_, b) in zip(eager, fast, strict=True):
            assert b == pytest.approx(a, rel=1e-4)
    assert result.max_param_diff < 1e-4
    assert set(result.sec_per_iter) == {"eager", "fastmlp", "trainstep"}
    assert all(s > 0 for s in result.sec_per_iter.values())
    out = capsys.readouterr().out
    assert "time/iter: eager" in out and "max |param diff| eager vs trainstep" in out


def test_transfer_learning_freezes_and_learns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    ckpt = tmp_path / "pretrained.pt"
    argv = ["--checkpoint", str(ckpt), "--pretrain-epochs", "3", "--epochs", "10"]
    result = transfer_learning.run(transfer_learning.parse_args(argv))
    assert result.frozen_unchanged and result.frozen_grad_none
    assert result.pretrain_acc > 0.8
    assert result.head_acc_after > 0.7  # ~0.84 here; chance is 0.5
    out = capsys.readouterr().out
    assert "bitwise unchanged: True" in out and ".grad is None:     True" in out
    assert "all checks passed" in out
    state = torch.load(ckpt, weights_only=True)
    assert list(state) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_run_main_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    def fail() -> None:
        raise _data.DataError("x.csv row 2: bad")

    assert _data.run_main(lambda: None) == 0
    assert _data.run_main(lambda: True) == 0
    assert _data.run_main(lambda: False) == 1
    assert _data.run_main(fail) == 2
    assert capsys.readouterr().err == "error: x.csv row 2: bad\n"


def test_train_step_option_matches_eager(digits_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--train-step: the fastmlp model trains through TrainStep, with eager's results."""
    result = train("--csv", digits_csv, "--epochs", 2, "--batch-size", 16, "--lr", 3e-3, "--train-step")
    assert "max |param diff| eager vs fastmlp" in capsys.readouterr().out
    for stats in result.history:
        assert stats.loss["fastmlp"] == pytest.approx(stats.loss["eager"], rel=1e-5)
    assert result.max_param_diff < 1e-4


# ---------------------------------------------------------------- ten-class digits (issue 20)

digits_10class = importlib.import_module("digits_10class")


def test_digits_10class_learns_and_matches_eager(capsys: pytest.CaptureFixture[str]) -> None:
    args = digits_10class.parse_args(["--epochs", "3", "--batch-size", "64", "--label-smoothing", "0.05"])
    result = digits_10class.run(args)
    assert isinstance(result.models["fastmlp"], digits_10class.torch_fastmlp.Sequential)
    for name in ("eager", "fastmlp", "trainstep"):
        assert len(result.loss[name]) == len(result.val_acc[name]) == 3
        assert result.loss[name][-1] < result.loss[name][0]  # it learns
        assert result.val_acc[name][-1] > 0.6  # ten classes: chance is 0.1
        assert all(s > 0 for s in result.seconds[name])
    for name in ("fastmlp", "trainstep"):
        for a, b in zip(result.loss["eager"], result.loss[name], strict=True):
            assert b == pytest.approx(a, rel=1e-4)
    assert result.max_param_diff < 1e-4
    out = capsys.readouterr().out
    assert "time/epoch: eager" in out and "max |param diff| eager vs trainstep" in out


def test_digits_10class_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        digits_10class.parse_args(["--label-smoothing", "2"])
    with pytest.raises(SystemExit):
        digits_10class.parse_args(["--epochs", "0"])
