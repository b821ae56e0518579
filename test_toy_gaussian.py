"""Tests for toy_gaussian.py: forward KL = moment matching, reverse KL = mode seeking,
and the multi-start reverse fit reports the best of its local optima."""

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
# widths, trimodal, a heavily overlapping pair, and two mirror-image pairs
# whose heavier mode is the narrower one, where a start next to the lighter
# mode ends there (the bug the multi-start fixes; see LIGHTER_MODE_NEARER).
MIXTURES = {
    "default": (tg.DEFAULT_MEANS, tg.DEFAULT_STDS, tg.DEFAULT_WEIGHTS),
    "symmetric": ((-2.0, 2.0), (1.0, 1.0), (0.5, 0.5)),
    "unequal": ((-1.0, 4.0), (0.5, 2.0), (0.8, 0.2)),
    "trimodal": ((-4.0, 0.0, 4.0), (1.0, 0.5, 1.5), (0.3, 0.3, 0.4)),
    "overlapping": ((0.0, 1.0), (1.0, 1.0), (1.0, 2.0)),
    "heavy left": ((-2.5, 2.5), (0.6, 0.9), (0.65, 0.35)),
    "heavy right": ((2.5, -2.5), (0.6, 0.9), (0.65, 0.35)),
}

# name -> (heavier mode's mean, lighter mode's mean, a single start next to
# the lighter mode: the old fixed start mean + 0.5 std (sigma = smallest
# component std), mirrored for the mirror image).
LIGHTER_MODE_NEARER = {
    "heavy left": (-2.5, 2.5, -0.75 + 0.5 * 2.490984, 0.6),
    "heavy right": (2.5, -2.5, 0.75 - 0.5 * 2.490984, 0.6),
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
def test_forward_fit_is_moment_matching_from_every_start(name):
    # Forward KL has a single optimum: every start ends at moment matching,
    # including the per-component ones, far from it (so the optimiser, not
    # the start, does the work).
    means, stds, weights = MIXTURES[name]
    mean, std = tg.mixture_moments(means, stds, weights)
    for _, mu0, sigma0 in tg.start_points(means, stds, weights):
        mu, sigma, kl = tg.fit_once(means, stds, weights, "forward", mu0, sigma0)
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


def test_single_start_picks_its_mode_and_init_adds_a_start():
    means, stds, weights = MIXTURES["default"]
    # One fit from one start ends in the mode it starts on ...
    left = tg.fit_once(means, stds, weights, "reverse", -3.0, 1.0)
    assert left[0] == pytest.approx(-3.0, abs=0.1)
    # ... but the reported fit is the best over all starts, the heavier right
    # mode, even when the extra start leads to the left one.
    for init in ({}, {"init_mu": -3.0, "init_sigma": 1.0}):
        best = tg.fit(means, stds, weights, "reverse", **init)
        assert best[0] == pytest.approx(3.0, abs=0.1)
        assert best[2] < left[2]  # the heavier mode is the better reverse-KL fit


def test_start_points():
    means, stds, weights = MIXTURES["default"]
    mean, std = tg.mixture_moments(means, stds, weights)
    assert tg.start_points(means, stds, weights) == [
        ("comp 1", -3.0, 1.0), ("comp 2", 3.0, 1.0), ("moments", mean, std)]
    # --init-mu / --init-sigma add one start; a missing half is the moments'.
    assert tg.start_points(means, stds, weights, init_mu=-1.0)[-1] == ("init", -1.0, std)
    assert tg.start_points(means, stds, weights, init_sigma=0.5)[-1] == ("init", mean, 0.5)
    assert len(tg.start_points(means, stds, weights, -1.0, 0.5)) == 4


def test_distinct_optima_merges_only_end_points_that_agree_in_mu_and_sigma():
    end_points = [("a", 1.0, 1.0, 0.5),
                  ("b", 1.0 + 1e-6, 1.0 - 1e-6, 0.5 + 1e-9),  # same optimum as a
                  ("c", 1.0, 2.0, 0.3),                       # same mu, other sigma
                  ("d", 3.0, 1.0, 0.9)]                       # other mu
    optima = tg.distinct_optima(end_points, scale=1.0)
    assert [o["starts"] for o in optima] == [["c"], ["a", "b"], ["d"]]  # best first
    assert [o["kl"] for o in optima] == [0.3, 0.5, 0.9]
    # The tolerance scales with the mixture: at scale 1e-4 the first two are
    # 1e-2 tolerances apart, i.e. distinct.
    assert len(tg.distinct_optima(end_points[:2], scale=1e-4)) == 2


def reverse_kl_grid_min(means, stds, weights):
    """Brute-force min of KL(q||p) over a fine (mu, log sigma) grid.

    Independent of the starts and of L-BFGS: if the fit reported a local
    optimum worse than the global one, some grid point near the global one
    would beat it.  A coarser z grid (801 points) keeps this cheap; the
    trapezoid rule is still accurate to far below the tolerance used.
    """
    means_t, stds_t = torch.tensor(means), torch.tensor(stds)
    _, std = tg.mixture_moments(means, stds, weights)
    mu = torch.linspace(float(means_t.min() - 2 * stds_t.max()),
                        float(means_t.max() + 2 * stds_t.max()), 81, dtype=tg.DTYPE)
    sigma = torch.exp(torch.linspace(math.log(0.5 * float(stds_t.min())),
                                     math.log(2 * std), 41, dtype=tg.DTYPE))
    mu, sigma = torch.meshgrid(mu, sigma, indexing="ij")
    kl = tg.reverse_kl(mu.reshape(-1, 1), sigma.reshape(-1, 1), means, stds, weights,
                       grid=tg.standard_grid(401))
    return float(kl.min())


def reverse_kl_hessian_eigenvalues(mu, sigma, means, stds, weights):
    """Eigenvalues of the Hessian of KL(q||p) in (mu, log sigma), the
    coordinates the fit optimises in."""
    def objective(params):
        return tg.reverse_kl(params[0], torch.exp(params[1]), means, stds, weights)
    point = torch.tensor([mu, math.log(sigma)], dtype=tg.DTYPE)
    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(objective, point))


@pytest.mark.parametrize("name", list(MIXTURES))
def test_reverse_fit_is_global_and_optima_are_local_minima(name):
    means, stds, weights = MIXTURES[name]
    optima = tg.local_optima(means, stds, weights, "reverse",
                             tg.start_points(means, stds, weights))
    best = optima[0]
    # The reported (best) optimum is the global one: no grid point beats it.
    assert best["kl"] <= reverse_kl_grid_min(means, stds, weights) + 1e-6
    for opt in optima:
        assert opt["kl"] >= best["kl"]
        # Every listed optimum is a true local minimum: zero gradient and a
        # positive-definite Hessian, not a saddle or an unconverged point.
        params = torch.tensor([opt["mu"], math.log(opt["sigma"])], dtype=tg.DTYPE,
                              requires_grad=True)
        tg.reverse_kl(params[0], torch.exp(params[1]), means, stds, weights).backward()
        assert params.grad.abs().max() < 1e-6
        assert (reverse_kl_hessian_eigenvalues(opt["mu"], opt["sigma"], *MIXTURES[name]) > 0).all()


@pytest.mark.parametrize("name", list(LIGHTER_MODE_NEARER))
def test_reverse_fit_finds_heavier_mode_when_start_is_nearer_lighter(name):
    means, stds, weights = MIXTURES[name]
    heavy, light, mu0, sigma0 = LIGHTER_MODE_NEARER[name]
    # The trap: a single fit started next to the lighter mode ends there.
    single = tg.fit_once(means, stds, weights, "reverse", mu0, sigma0)
    assert single[0] == pytest.approx(light, abs=0.1)
    # The toy's reported reverse fit sits on the heavier mode, and beats
    # every listed local optimum, among them the lighter mode's.
    result = tg.run(means, stds, weights)
    rev, optima = result["reverse"], result["reverse_optima"]
    assert rev["mu"] == pytest.approx(heavy, abs=0.1)
    assert all(rev["kl_reverse"] <= opt["kl_reverse"] for opt in optima)
    assert any(opt["mu"] == pytest.approx(light, abs=0.1) for opt in optima)
    assert rev["kl_reverse"] < single[2]


def test_fit_is_deterministic():
    # From a start far from the optimum (the fit travels from the left mode
    # to the broad optimum), so a nondeterministic step would show.
    means, stds, weights = MIXTURES["trimodal"]
    for direction in ("forward", "reverse"):
        first = tg.fit_once(means, stds, weights, direction, -4.0, 1.0)
        assert tg.fit_once(means, stds, weights, direction, -4.0, 1.0) == first


def test_fit_rejects_unknown_direction():
    with pytest.raises(ValueError):
        tg.fit(*MIXTURES["default"], "sideways")


def check_json(data):
    """Keys and values of the --json object for the default teacher."""
    assert set(data) == {"mixture", "starts", "forward", "reverse",
                         "forward_optima", "reverse_optima"}
    assert set(data["mixture"]) == {"mean", "std"}
    assert [s["name"] for s in data["starts"]] == ["comp 1", "comp 2", "moments"]
    for direction in ("forward", "reverse"):
        assert set(data[direction]) == {"mu", "sigma", "kl"}
        for opt in data[f"{direction}_optima"]:
            assert set(opt) == {"mu", "sigma", "kl_forward", "kl_reverse", "starts"}
    # Forward KL: one optimum, reached from every start.  Reverse KL: three
    # (the right mode, the compromise, the left mode), best first, the first
    # being the reported fit; together they account for every start.
    assert len(data["forward_optima"]) == 1
    assert data["forward_optima"][0]["starts"] == ["comp 1", "comp 2", "moments"]
    rev_optima = data["reverse_optima"]
    assert [round(o["mu"]) for o in rev_optima] == [3, 0, -3]
    assert sorted(s for o in rev_optima for s in o["starts"]) == ["comp 1", "comp 2", "moments"]
    kls = [o["kl_reverse"] for o in rev_optima]
    assert kls == sorted(kls)
    assert rev_optima[0]["mu"] == data["reverse"]["mu"]
    assert rev_optima[0]["kl_reverse"] == pytest.approx(data["reverse"]["kl"], rel=1e-12)
    for opt in rev_optima:
        default = MIXTURES["default"]
        assert opt["kl_forward"] == pytest.approx(
            tg.forward_kl(opt["mu"], opt["sigma"], *default).item(), rel=1e-9)
        assert opt["kl_reverse"] == pytest.approx(
            tg.reverse_kl(opt["mu"], opt["sigma"], *default).item(), rel=1e-9)
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
    # A real command-line run: the whole of stdout must be one JSON object,
    # and --json alone writes no figure into the working directory.
    proc = subprocess.run(
        [sys.executable, str(HERE / "toy_gaussian.py"), "--json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=True)
    check_json(json.loads(proc.stdout))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, expected", [
    ([], "toy_gaussian.png"),                      # table: figure by default
    (["--out", "f.png"], "f.png"),
    (["--json"], None),                            # JSON: no figure ...
    (["--json", "--out", "f.png"], "f.png"),       # ... unless asked for
    (["--json", "--no-plot"], None),               # old spelling still accepted
    (["--no-plot"], None),
    (["--no-plot", "--out", "f.png"], None),       # --no-plot wins
])
def test_figure_path(argv, expected):
    assert tg.figure_path(tg.parse_args(argv)) == expected


def test_main_json_writes_png_when_asked(tmp_path, capsys):
    # In-process (a second subprocess would cost seconds of torch import).
    out = tmp_path / "fig.png"
    tg.main(["--json", "--out", str(out)])
    check_json(json.loads(capsys.readouterr().out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tg.main(["--no-plot", "--means", "-2.5", "2.5", "--stds", "0.6", "0.9",
             "--weights", "0.65", "0.35"])
    lines = capsys.readouterr().out.splitlines()
    assert "KL(p||q)" in lines[2] and "KL(q||p)" in lines[2]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert rows["forward"].endswith("all 3 starts")
    # The reported reverse fit is the heavier left mode; the lighter right
    # mode and the compromise are listed after it, with the start that found them.
    rev = rows["reverse"].split()
    assert rev[:3] == ["reverse", "KL", "fit"] and float(rev[3]) == pytest.approx(-2.5, abs=0.1)
    others = [line for line in lines if line.startswith("  other local optimum")]
    assert len(others) == 2
    assert any(float(line.split()[3]) == pytest.approx(2.5, abs=0.1)
               and line.endswith("comp 2") for line in others)
    means, stds, weights = (-2.5, 2.5), (0.6, 0.9), (0.65, 0.35)
    fits = {name: [float(x) for x in rows[name].split()[3:7]] for name in ("forward", "reverse")}
    for mu, sigma, fwd, rev in fits.values():  # each KL column is the KL it names, at the printed (rounded) fit
        assert fwd == pytest.approx(tg.forward_kl(mu, sigma, means, stds, weights).item(), rel=1e-3)
        assert rev == pytest.approx(tg.reverse_kl(mu, sigma, means, stds, weights).item(), rel=1e-3)
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
