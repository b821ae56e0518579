"""Tests for toy_gaussian.py: forward KL = moment matching, reverse KL = mode seeking."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy_gaussian as tg

HERE = Path(__file__).resolve().parent

# (means, stds, weights): bimodal default, symmetric, unequal weights and
# widths, trimodal, and a heavily overlapping pair.
MIXTURES = {
    "default": (tg.DEFAULT_MEANS, tg.DEFAULT_STDS, tg.DEFAULT_WEIGHTS),
    "symmetric": ((-2.0, 2.0), (1.0, 1.0), (0.5, 0.5)),
    "unequal": ((-1.0, 4.0), (0.5, 2.0), (0.8, 0.2)),
    "trimodal": ((-4.0, 0.0, 4.0), (1.0, 0.5, 1.5), (0.3, 0.3, 0.4)),
    "overlapping": ((0.0, 1.0), (1.0, 1.0), (1.0, 2.0)),
}


def test_mixture_moments_against_numerical_integration():
    means, stds, weights = MIXTURES["trimodal"]
    mean, std = tg.mixture_moments(means, stds, weights)
    x = tg.integration_grid(means, stds, weights)
    p = torch.exp(tg.mixture_log_density(x, means, stds, weights))
    assert float(torch.trapezoid(p, x)) == pytest.approx(1.0, abs=1e-9)
    num_mean = float(torch.trapezoid(x * p, x))
    num_var = float(torch.trapezoid((x - num_mean) ** 2 * p, x))
    assert mean == pytest.approx(num_mean, abs=1e-9)
    assert std == pytest.approx(math.sqrt(num_var), rel=1e-9)


def test_log_density_does_not_underflow_in_tails():
    # 40 std from every component: exp(-800) underflows, but log p must not.
    lp = tg.mixture_log_density(torch.tensor([-43.0, 43.0]), *MIXTURES["default"])
    assert torch.isfinite(lp).all()
    # And it matches the dominant component's log density there.
    expected = math.log(0.6) + float(tg.gaussian_log_density(43.0, 3.0, 1.0))
    assert float(lp[1]) == pytest.approx(expected, rel=1e-12)


def test_kls_are_zero_for_identical_distributions_and_positive_otherwise():
    one = ((1.5,), (0.7,), (1.0,))
    assert tg.forward_kl(1.5, 0.7, *one).item() == pytest.approx(0.0, abs=1e-10)
    assert tg.reverse_kl(1.5, 0.7, *one).item() == pytest.approx(0.0, abs=1e-10)
    # Closed form KL(N(0,1) || N(1.5,0.7)) for a single-Gaussian "mixture".
    closed = math.log(0.7) + (1 + 1.5 ** 2) / (2 * 0.7 ** 2) - 0.5
    assert tg.reverse_kl(0.0, 1.0, *one).item() == pytest.approx(closed, rel=1e-9)
    assert tg.forward_kl(0.0, 1.0, *one).item() > 0.1


@pytest.mark.parametrize("name", list(MIXTURES))
def test_forward_fit_is_moment_matching(name):
    means, stds, weights = MIXTURES[name]
    mean, std = tg.mixture_moments(means, stds, weights)
    mu, sigma, kl = tg.fit(means, stds, weights, "forward")
    assert mu == pytest.approx(mean, rel=0.01, abs=0.01 * std)
    assert sigma == pytest.approx(std, rel=0.01)
    # The reported KL is the forward KL at the fitted parameters.
    expected = tg.forward_kl(mu, sigma, means, stds, weights).item()
    assert kl == pytest.approx(expected, rel=1e-9)


def test_reverse_fit_is_mode_seeking_on_separated_mixture():
    means, stds, weights = (-5.0, 5.0), (1.0, 0.8), (0.3, 0.7)
    mu, sigma, kl = tg.fit(means, stds, weights, "reverse")
    _, sigma_fwd, _ = tg.fit(means, stds, weights, "forward")
    # No worse than a Gaussian sitting exactly on any single component.
    for m, s in zip(means, stds):
        assert kl <= tg.reverse_kl(m, s, means, stds, weights).item() + 1e-10
    # It found the heavier right-hand mode, with about that mode's width,
    # much narrower than the mass-covering forward fit.
    assert mu == pytest.approx(5.0, abs=0.1)
    assert sigma == pytest.approx(0.8, rel=0.05)
    assert sigma < 0.5 * sigma_fwd


def test_init_picks_the_mode():
    means, stds, weights = MIXTURES["default"]
    left = tg.fit(means, stds, weights, "reverse", init_mu=-3.0)
    right = tg.fit(means, stds, weights, "reverse")
    assert left[0] == pytest.approx(-3.0, abs=0.1)
    assert right[0] == pytest.approx(3.0, abs=0.1)
    assert right[2] < left[2]  # the heavier mode is the better reverse-KL fit


def test_fit_is_deterministic():
    means, stds, weights = MIXTURES["trimodal"]
    for direction in ("forward", "reverse"):
        first = tg.fit(means, stds, weights, direction)
        assert tg.fit(means, stds, weights, direction) == first


def test_fit_rejects_unknown_direction():
    with pytest.raises(ValueError):
        tg.fit(*MIXTURES["default"], "sideways")


def check_json(data):
    """Keys and values of the --json object for the default teacher."""
    assert set(data) == {"mixture", "forward", "reverse"}
    assert set(data["mixture"]) == {"mean", "std"}
    for direction in ("forward", "reverse"):
        assert set(data[direction]) == {"mu", "sigma", "kl"}
    assert data["mixture"]["mean"] == pytest.approx(0.6, abs=1e-9)
    assert data["forward"]["sigma"] == pytest.approx(data["mixture"]["std"], rel=0.01)
    assert data["reverse"]["mu"] == pytest.approx(3.0, abs=0.1)
    # Each "kl" is the objective that fit minimised.
    fwd, rev = data["forward"], data["reverse"]
    default = MIXTURES["default"]
    fwd_kl = tg.forward_kl(fwd["mu"], fwd["sigma"], *default).item()
    rev_kl = tg.reverse_kl(rev["mu"], rev["sigma"], *default).item()
    assert fwd["kl"] == pytest.approx(fwd_kl, rel=1e-6)
    assert rev["kl"] == pytest.approx(rev_kl, rel=1e-6)


def test_cli_json_subprocess(tmp_path):
    # A real command-line run: the whole of stdout must be one JSON object.
    proc = subprocess.run(
        [sys.executable, str(HERE / "toy_gaussian.py"), "--json", "--no-plot"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, check=True)
    check_json(json.loads(proc.stdout))
    assert list(tmp_path.iterdir()) == []  # --no-plot wrote nothing


def test_main_json_writes_png_when_asked(tmp_path, capsys):
    # In-process (a second subprocess would cost seconds of torch import).
    out = tmp_path / "fig.png"
    tg.main(["--json", "--out", str(out)])
    check_json(json.loads(capsys.readouterr().out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tg.main(["--no-plot", "--means", "-2", "2", "--stds", "1", "1", "--weights", "1", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "teacher mixture: mean = 0.0000, std = 2.2361"  # sqrt(1 + 2²)
    assert out[1].split() == ["fit", "mu", "sigma", "KL(p||q)", "KL(q||p)"]
    fits = {line.split(" KL fit")[0]: [float(x) for x in line.split(" KL fit")[1].split()] for line in out[2:4]}
    assert set(fits) == {"forward", "reverse"}
    assert fits["forward"][:2] == [0.0, 2.2361]  # moment matching
    means, stds, weights = (-2.0, 2.0), (1.0, 1.0), (0.5, 0.5)
    for mu, sigma, fwd, rev in fits.values():  # each column is the KL it names, at the printed fit
        assert fwd == pytest.approx(tg.forward_kl(mu, sigma, means, stds, weights).item(), abs=2e-4)
        assert rev == pytest.approx(tg.reverse_kl(mu, sigma, means, stds, weights).item(), abs=2e-4)
    assert fits["forward"][2] < fits["reverse"][2] and fits["reverse"][3] < fits["forward"][3]  # each fit wins its own KL
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_mismatched_lengths(capsys):
    with pytest.raises(SystemExit) as exc:
        tg.parse_args(["--means", "-2", "2", "--stds", "1"])
    assert exc.value.code == 2 and "same number" in capsys.readouterr().err


def test_import_has_no_side_effects():
    code = "import sys, toy_gaussian; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=HERE, check=True, timeout=60,
                   capture_output=True)
