"""--decode: the static-cache decoder computes what the growing cache computes. Static decoding is the path that a
GPU replays from CUDA graphs (graph mode runs the very same padded forwards, captured once), so these CPU tests
prove its numbers; only the capture and replay themselves need a GPU (gpu_check.py runs them)."""

import inspect
import os
from collections import Counter
from contextlib import contextmanager, nullcontext

import pytest
import torch

from transformers import GPT2Config, GPT2LMHeadModel

import eval as E
import minillm as M
from test_families import family
from test_minillm import boost_eos, tiny_gpt2

os.environ["HF_HUB_OFFLINE"] = "1"

KEYS = ["tokens", "mask", "logp_student", "logp_teacher", "logp_mix", "w", "kl", "top1", "teacher_logits"]


def pair(name, window=64, device="cpu"):
    """A tiny teacher and student of `name`'s architecture, fp32 heads, flat enough and EOS (id 3) likely enough
    that rows end at different steps. Gemma 2's sliding window is set to `window`."""
    models = []
    for seed in (1, 2):
        m = family(name, 300, seed)
        with torch.no_grad():
            m.get_output_embeddings().weight.div_(10.0)  # family() sharpens by 30: rows would loop and never end
        if name == "gemma2":
            m.config.sliding_window = window
        models.append(boost_eos(M.fp32_head(m.to(device)), 3, 3.0))
    return models


def left_padded_batch():
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]
    return M.collate_prompts(prompts, pad_id=0)


def rollouts(student, teacher, alpha, decode, batch=None, n=24, eos=3, **kw):
    """sample_rollouts over `batch` (default: left_padded_batch()), with seeded coins and draws."""
    ids, attn = batch or left_padded_batch()
    coins = torch.rand(n, generator=torch.Generator().manual_seed(5)) < alpha
    return M.sample_rollouts(student, teacher, ids, attn, torch.tensor([eos]), 0, n, alpha, coins=coins,
                             generator=torch.Generator().manual_seed(7), decode=decode, **kw)


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_static_decoding_equals_eager(name, alpha):
    """Same seed, fp32: the same tokens, and every recorded tensor (log-probs, weights, KL, masks, the teacher's
    log-probabilities) within 1e-5, on left-padded prompts whose rows end at different steps."""
    student, teacher = pair(name)
    eager, static = (rollouts(student, teacher, alpha, d) for d in ("eager", "static"))
    lengths = eager["mask"].sum(1)
    assert lengths.min() < lengths.max()  # ragged
    for k in KEYS:
        assert eager[k].shape == static[k].shape, k
        torch.testing.assert_close(static[k].float(), eager[k].float(), atol=1e-5, rtol=0, msg=k)


def test_padded_forwards_stay_inside_a_learned_position_table():
    """GPT-2's positions are a table of n_positions rows. A catch-up padded to its bucket runs past the last real
    token; with prompt + response = n_positions exactly, its padding would index past the table and the cache (on a
    GPU: a device-side assert that ends the process). Padding past the end shares the last slot, which no real token
    takes, and its position: the rollouts are the eager ones."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    student, teacher = (M.fp32_head(GPT2LMHeadModel(cfg).eval()) for _ in range(2))
    ids, attn = torch.randint(2, 40, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    coins = torch.zeros(24, dtype=torch.bool)
    coins[2] = True  # the teacher's last catch-up: 21 positions, padded to 32
    out = [M.sample_rollouts(student, teacher, ids, attn, torch.tensor([99]), 0, 24, 0.5, coins=coins,
                             generator=torch.Generator().manual_seed(1), decode=d) for d in ("eager", "static")]
    assert out[0]["tokens"].shape == (2, 24)
    for k in KEYS:
        torch.testing.assert_close(out[1][k].float(), out[0][k].float(), atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("device,decode", [("cpu", "static"), ("cpu", "graph"), pytest.param("cuda", "graph", marks=(
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (gpu_check.py runs this test there)")))])
@pytest.mark.parametrize("own_generator", [True, False])
def test_sample_model_equals_eager(request, device, decode, own_generator):
    """The single-model sampler (evaluation, SeqKD's teacher answers) on a static cache, and replayed from graphs
    (on the CPU under the model of CUDA graphs below; on a GPU, fp32, real ones): the same tokens as eager, batch after
    batch from one generator (a given one, or torch's default). They check for the end every 8 tokens, so they draw
    a few tokens past it; those are dropped and their uniforms given back: the generator is left where eager leaves it."""
    if decode == "graph" and device == "cpu":
        request.getfixturevalue("cpu_graphs")
    model = boost_eos(M.fp32_head(tiny_gpt2(40, 3, scale=5.0)).to(device), 1, 2.0)
    ids, attn = (x.to(device) for x in left_padded_batch())
    out, state = {}, {}
    for d in ("eager", decode):
        M.release_decoders()
        torch.manual_seed(2)
        g = torch.Generator(device).manual_seed(2) if own_generator else None
        out[d] = [M.sample_model(model, ids % 40, attn, [1], 0, 40, generator=g, decode=d, width=9) for _ in range(3)]
        state[d] = (g or M.default_generator(device)).get_state()
    lengths = [x.shape[1] for x in out["eager"]]
    assert max(lengths) < 40 and any(n % M.CHECK_EVERY for n in lengths), lengths  # ended early, between two checks
    if device == "cpu":
        assert all((x == 0).any() for x in out["eager"])  # rows ended and were padded
    for a, b in zip(out["eager"], out[decode]):
        assert torch.equal(a, b)
    assert torch.equal(state["eager"], state[decode])
    if decode == "graph":
        assert [(d.mode, set(d.graphs)) for d in M._decoders.values()] == [("graph", {1})]  # one decoder for 3 batches
    M.release_decoders()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a CUDA GPU (gpu_check.py runs this test there)")), pytest.param("cuda:0", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="a CUDA GPU"))])
def test_default_generator_is_the_one_torch_rand_draws_from_cuda_too(device):
    """sample_model rewinds the generator a draw without one uses: M.default_generator(device) must be it."""
    g = M.default_generator(device)
    state = g.get_state()
    a = torch.rand(5, device=device)
    g.set_state(state)
    assert torch.equal(torch.rand(5, device=device), a)


class Words:
    """The tokenizer part that eval.generate and teacher_responses use: ids written out as words."""
    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def test_eval_and_seqkd_answers_are_eager_s_under_static_decoding():
    """eval.py's sampling (a seed's generator, batch after batch, 5 batches of ragged prompts) and SeqKD's teacher
    answers (torch's default generator) with --decode static give eager's answers, word for word."""
    model = boost_eos(M.fp32_head(tiny_gpt2(40, 1, scale=5.0)), 1, 2.0)
    lengths = [1, 7, 3, 5, 2, 9, 4, 6, 8]
    prompts = [[2 + (i * 7 + j) % 37 for j in range(n)] for i, n in enumerate(lengths)]
    answers = {}
    for decode in ("eager", "static"):
        args = E.parse_args(["--model", "x", "--device", "cpu", "--max-new-tokens", "40", "--batch-size", "2",
                             "--decode", decode, "--out", "unused"])
        evals = E.generate(model, Words(), [{"prompt_ids": p} for p in prompts], 10, args, torch.float32)
        args = M.parse_args(["--device", "cpu", "--max-new-tokens", "40", "--gen-batch-size", "2", "--decode", decode])
        torch.manual_seed(3)
        answers[decode] = evals, M.teacher_responses(model, Words(), prompts, args, torch.float32)
    evals, seqkd = answers["eager"]
    widths = [max(n for _, n in evals[i:i + 2]) + 1 for i in range(0, len(evals), 2)]  # each batch's, its end included
    assert max(widths) < 40 and any(w % M.CHECK_EVERY for w in widths), widths  # static decodes past some batch's end
    assert len({len(a.split()) for a in seqkd}) > 2
    assert answers["static"] == answers["eager"]


def test_every_forward_after_the_prompt_has_a_bucket_length(monkeypatch):
    """Graph mode captures one graph per forward length: after the prompt, every static forward runs at one of
    BUCKETS (padded), whatever the coins, so a model needs at most len(BUCKETS) graphs."""
    student, teacher = pair("gpt2")
    lengths = []
    run = M.Decoder.run
    monkeypatch.setattr(M.Decoder, "run", lambda self, ids, keep=0: lengths.append(ids.shape[1]) or run(self, ids, keep))
    rollouts(student, teacher, 0.3, "static", max_chunk=5)
    width = left_padded_batch()[0].shape[1]
    assert lengths[0] == width  # the student's prompt
    later = lengths[1:]
    assert set(later) <= set(M.BUCKETS) and {1, 2, 4} <= set(later), later  # steps, and padded catch-ups


def test_static_decoding_checks_for_the_end_every_few_tokens(monkeypatch):
    """The end-of-rollouts check reads a tensor on the host, which waits for the device: eager checks at every token,
    static every CHECK_EVERY tokens and drops the columns it decoded after the last row ended: the same rollouts."""
    student, teacher = pair("llama")
    calls, out = {"eager": 0, "static": 0}, {}
    for decode in calls:
        check = M.all_done
        monkeypatch.setattr(M, "all_done", lambda done, *m, d=decode: calls.__setitem__(d, calls[d] + 1) or check(done, *m))
        out[decode] = rollouts(student, teacher, 0.2, decode)
        monkeypatch.setattr(M, "all_done", check)
    n = out["eager"]["mask"].shape[1]
    assert n < M.CHECK_EVERY and calls == {"eager": n, "static": 1}  # every row ended before the first static check
    assert torch.equal(out["eager"]["tokens"], out["static"]["tokens"])


def test_a_window_shorter_than_the_sequence_decodes_eagerly(capsys):
    """Gemma 2 with an 8-token window over a longer sequence: our mask would have to slide, so the model decodes
    eagerly and says why, once per model; the rollouts are the eager ones."""
    student, teacher = pair("gemma2", window=8)
    eager, static = (rollouts(student, teacher, 0.2, d, n=10) for d in ("eager", "static"))
    assert torch.equal(eager["tokens"], static["tokens"])
    err = capsys.readouterr().err
    assert err.count("decodes eagerly: its sliding window (8) is shorter than") == 2  # teacher and student


def test_decode_modes_by_device():
    """auto: CUDA graphs on CUDA, eager on the CPU. graph on the CPU is refused before anything loads."""
    assert M.decode_mode("auto", "cuda:1") == "graph" and M.decode_mode("auto", "cpu") == "eager"
    assert M.decode_mode("static", "cpu") == "static"
    for parse in (M.parse_args, lambda argv: E.parse_args(["--model", "x", "--out", "unused", *argv])):  # eval.py too
        with pytest.raises(SystemExit):
            parse(["--device", "cpu", "--decode", "graph"])
        assert parse(["--device", "cpu"]).decode == "auto" and parse(["--device", "cpu", "--decode", "static"])


def test_a_kept_decoder_restarted_on_new_prompts_decodes_them_as_a_fresh_one():
    """Static (and graph) decoders are kept from one batch to the next of a collection and restarted in place, the
    last batch's keys and values still in their slots: the next batch's rollouts are still the eager ones."""
    student, teacher = pair("llama")
    M.release_decoders()
    ids, attn = left_padded_batch()
    other = ids.flip(0), attn.flip(0)  # the same shape, other rows (the decoders are kept per shape)
    kept = [M.sample_rollouts(student, teacher, i, a, torch.tensor([3]), 0, 24, 0.2, generator=torch.Generator().manual_seed(7),
                              decode="static") for i, a in [(ids, attn), other]]
    assert len(M._decoders) == 2  # one for the teacher, one for the student, reused
    eager = M.sample_rollouts(student, teacher, *other, torch.tensor([3]), 0, 24, 0.2,
                              generator=torch.Generator().manual_seed(7), decode="eager")
    M.release_decoders()
    assert not M._decoders
    for k in KEYS:
        torch.testing.assert_close(kept[1][k].float(), eager[k].float(), atol=1e-5, rtol=0, msg=k)


class HostTraffic(M.HostReads):
    """minillm.HostReads (the operators a CUDA graph cannot capture, seen at torch's dispatcher: real tensors on the
    CPU, as on a GPU), counted by name, and stricter by one: a tensor made from host data (torch.tensor(...),
    lift_fresh), which on a GPU is a copy from the host unless it is a 0-dim scalar operand (the CPU cannot tell
    these apart). A copy between host and device cannot be seen on the CPU: .cpu() and .tolist() read no device
    there. Nothing is counted while `paused`."""

    def __init__(self):
        super().__init__()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        n = len(self.seen)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.paused:
            del self.seen[n:]
        elif func._schema.name == "aten::lift_fresh":
            self.seen.append("aten::lift_fresh")
        return out

    @property
    def ops(self):
        return Counter(self.seen)


def test_host_traffic_sees_what_a_graph_cannot_capture():
    """The spy itself: each way of reading or making a tensor on the host is counted, and device-side work is not
    (arithmetic, integer indexing, repeat_interleave by an int)."""
    pos, x = torch.tensor(3), torch.arange(6.0)
    with HostTraffic() as spy:
        torch.arange(5) + x.sum(), x[x.long()[:2]], x.repeat_interleave(2)  # device work only
        assert not spy.ops, spy.ops
        torch.arange(pos, pos + 2), bool(x.all()), x.nonzero(), torch.tensor([1, 2]), x[x > 2], x.unique()
        torch.repeat_interleave(x, x.long())
    assert spy.ops == {"aten::_local_scalar_dense": 3, "aten::nonzero": 1, "aten::lift_fresh": 1, "aten::index": 1,
                       "aten::_unique2": 1, "aten::repeat_interleave": 1}
    with M.HostReads() as reads:  # a copy from the host to a device (meta stands for it here)
        x.to("meta")
    assert reads.seen == ["aten::_to_copy"]


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama", "qwen2", "gemma2"])
def test_the_forward_a_graph_captures_reads_nothing_on_the_host(name):
    """Graph mode captures Decoder.run on a bucket length. A forward that read a tensor on the host (transformers
    computing cache positions from the cache's length, say) could not be captured, and graph mode would fall back to
    static decoding for the whole run: after the prompt, each family's static forward, the fp32 head included, does
    none of HostTraffic's operators, however many tokens it runs."""
    student, _ = pair(name)
    ids, attn = left_padded_batch()
    dec = M.Decoder(M.unwrap(student), ids, attn, ids.shape[1] + 24, "static", ids.shape[1])
    dec(None, keep=1)  # the prompt: allocates the cache (it may read what it likes: it is never captured)
    for n in (1, 4):
        dec.ids[:, :n] = 5
        with HostTraffic() as spy:
            logits = dec.run(dec.ids[:, :n])
        assert not spy.ops, (n, spy.ops)
        assert logits.shape == (4, n, 300) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama", "qwen2", "gemma2"])
def test_the_forward_a_graph_captures_moves_nothing_between_host_and_device(name, monkeypatch):
    """On the CPU a copy from the host cannot be seen (host and device are one). On the meta device, which stands
    for the GPU here, a tensor built on the host (torch.arange without a device, say) and moved over is a copy that
    HostReads sees: the static forward after the prompt makes none, for each family (the stock head: the fp32 head
    asks autocast about the meta device, which autocast does not know; HostReads covers it on the CPU above)."""
    model = family(name, 300, 1).to("meta")
    if name == "gemma2":
        model.config.sliding_window = 64
    ids, attn = (x.to("meta") for x in left_padded_batch())
    dec = M.Decoder(model, ids, attn, ids.shape[1] + 24, "static", ids.shape[1])
    with torch.no_grad():
        dec(None, keep=1)
        for n in (1, 4):
            with M.HostReads() as reads:
                logits = dec.run(dec.ids[:, :n])
            assert not reads.seen and logits.shape == (4, n, 300), reads.seen
        block = model.get_decoder().layers[0] if hasattr(model.get_decoder(), "layers") else model.transformer.h[0]
        forward = block.forward
        monkeypatch.setattr(block, "forward", lambda h, *a, **kw: forward(h + torch.zeros(h.shape[-1]).to(h.device), *a, **kw))
        with M.HostReads() as reads:  # the same check sees a planted one
            dec.run(dec.ids[:, :1])
        assert reads.seen == ["aten::_to_copy"]


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_static_sampling_waits_for_the_device_once_per_few_tokens(alpha, monkeypatch):
    """No host-device synchronisation inside the decode loop: over N = 40 tokens that no row ends early, the static
    sampler reads the device on the host once per CHECK_EVERY tokens and once at the end (to trim), against eager's
    reads at every token (its end check and transformers' own, in every forward). The prompts' forwards are not
    counted; on a GPU the coins' one .tolist() adds a read (the CPU's copy is no read)."""
    student, teacher = pair("gpt2")
    N, reads = 40, {}
    spy, call = HostTraffic(), M.Decoder.__call__

    def uncounted_prompt(self, *a, **kw):  # the prompt's forward is never captured: it may read what it likes
        spy.paused = self.filled == 0
        try:
            return call(self, *a, **kw)
        finally:
            spy.paused = False
    monkeypatch.setattr(M.Decoder, "__call__", uncounted_prompt)
    for decode in ("eager", "static"):
        M.release_decoders()
        spy.seen.clear()
        with spy:
            out = rollouts(student, teacher, alpha, decode, n=N, eos=299)  # 299: a token these models never draw
        assert out["mask"].all()  # nobody ended: every check came back "not yet"
        reads[decode] = spy.ops["aten::_local_scalar_dense"] + spy.ops["aten::nonzero"]
    M.release_decoders()
    assert reads["static"] <= N // M.CHECK_EVERY + 2, reads  # 4 end checks (t = 7, 15, 23, 31), the trim (nonzero, int)
    assert reads["eager"] >= N, reads


# ---------------------------------------------------------------------------------------------------
# Graph mode's own code (Decoder.capture, replay, the fall-back) under the semantics of a CUDA graph, on the CPU.
# A CUDA graph records the kernels of one run, with the addresses they read and write, and a replay launches the
# same kernels on the same addresses: whatever the run decided on the host (a shape, an index held in a Python int)
# is frozen at capture, and every tensor made inside the capture keeps its memory. CPUGraph does that at torch's
# dispatcher: capture records every operator with its argument tensors and its outputs; replay runs the operators
# again, in order, on those same tensors (reading their current values), and writes each result into the recorded
# output. Reading a tensor on the host during capture raises, as CUDA refuses it. This is a model of graph
# semantics for our bookkeeping (what is captured, which buffers a replay reads, slicing, restarts); the real capture
# and replay run on a GPU (test_graph_decoding_replays_static_decoding_on_cuda).

class CPUGraph:
    """torch.cuda.CUDAGraph's part that Decoder uses: replay(). Graphs captured into one pool share memory: a graph
    captured later may have been given what an earlier one freed (its intermediates; never a tensor still alive), so
    a replay may overwrite whatever the graphs captured after it in the pool computed, their outputs included.
    Modelled by filling the fresh floating-point tensors of those graphs with NaN at each replay: an output read after
    such a replay reads NaN."""

    def __init__(self, graphs):
        self.ops, self.pool, self.graphs = [], None, graphs  # graphs: every CPUGraph made

    @torch.no_grad()
    def replay(self):  # the recorded operators are those autocast chose: not to be cast again (a GPU replays kernels)
        for other in self.graphs[self.graphs.index(self) + 1:]:  # captured after this one
            if other.pool is self.pool:
                other.overwritten()
        for func, args, kwargs, out in self.ops:
            with torch.autocast("cpu", enabled=False):
                new = func(*args, **kwargs)
            for o, n in zip(*(x if isinstance(x, (tuple, list)) else [x] for x in (out, new))):
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() != n.untyped_storage().data_ptr():
                    o.copy_(n)  # into the memory the later operators read (a view or an in-place op: already there)

    def overwritten(self):
        for func, args, kwargs, out in self.ops:
            if all(r.alias_info is None for r in func._schema.returns):  # made in the capture: in the pool's memory
                for o in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(o, torch.Tensor) and o.is_floating_point():
                        o.fill_(float("nan"))


class Capture(HostTraffic):
    """torch.cuda.graph(g, pool=...): record into g.ops, on a capture stream made current for the block; what
    HostTraffic counts is refused, as CUDA refuses a host read mid-capture; the tensors it made read NaN until a
    replay (a CUDA capture launches nothing). A capture that fails fails again at its
    end (capture_end), the first error as its __context__, and leaves the capture stream current, as torch's does."""

    def __init__(self, graph, pool=None, **kw):
        super().__init__()
        self.graph, graph.pool = graph, pool

    def __enter__(self):
        self.before, Stream.current = Stream.current, Stream("capture")
        return super().__enter__()

    def __exit__(self, kind, error, tb):
        super().__exit__(kind, error, tb)
        if error is not None:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        Stream.current = self.before
        self.graph.overwritten()  # a capture computes nothing: what it made holds garbage until a replay

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.seen:
            raise RuntimeError(f"operation not permitted when stream is capturing ({self.seen[0]})")
        self.graph.ops.append((func, args, kwargs or {}, out))
        return out


class Stream:
    """torch.cuda.Stream: which one is current (Stream.main, a side stream inside torch.cuda.stream, a capture's),
    and the order of waits and forwards in `log`."""
    main = current = None
    log = []
    waits = inspect.signature(torch.cuda.Stream.wait_stream)  # the real one's (torch.cuda.Stream is this class in a test)

    def __init__(self, name="side"):
        self.name = name

    def wait_stream(self, other):
        self.waits.bind(self, other)
        Stream.log.append(f"{self.name} waits for {other.name}")

    @staticmethod
    @contextmanager
    def made_current(stream):
        before, Stream.current = Stream.current, stream
        try:
            yield
        finally:
            Stream.current = before


def called_as(real, fake):
    """fake, which refuses any call that the real torch function would refuse by its signature (torch's own)."""
    signature = inspect.signature(real)

    def call(*args, **kwargs):
        signature.bind(*args, **kwargs)
        return fake(*args, **kwargs)
    return call


@pytest.fixture
def cpu_graphs(monkeypatch):
    """torch.cuda's graph and stream calls that Decoder.capture and replay make, as CPUGraph and Capture; and graph
    mode allowed off CUDA. Yields the graphs captured."""
    made = []
    Stream.main = Stream.current = Stream("main")
    Stream.log = []
    for name, fake in [("CUDAGraph", lambda: made.append(CPUGraph(made)) or made[-1]), ("graph", Capture),
                       ("graph_pool_handle", object), ("Stream", Stream), ("current_stream", lambda: Stream.current),
                       ("stream", Stream.made_current), ("set_stream", lambda s: setattr(Stream, "current", s)),
                       ("synchronize", lambda: None)]:
        monkeypatch.setattr(torch.cuda, name, called_as(getattr(torch.cuda, name), fake))
    supported = M.static_unsupported
    monkeypatch.setattr(M, "static_unsupported", lambda model, n, mode: supported(model, n, "static"))
    M.release_decoders()
    yield made
    M.release_decoders()
    assert Stream.current is Stream.main  # every side stream and capture stream left, a failed capture's too


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("alpha", [0.2, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_mode_replays_static_decoding_under_graph_semantics(cpu_graphs, monkeypatch, name, alpha, dtype):
    """Graph mode over 24 tokens, catch-ups padded to their bucket, its graphs captured on a first batch and replayed
    on a second batch of other prompts (the decoders restarted in place) after an in-place update of the student's weights (what an optimizer step does),
    gives static decoding's tokens and every recorded tensor, bitwise, in fp32 and under bf16 autocast (fp32 student,
    bf16 teacher): each replay reads the step's tokens, the write position, the masks and the weights from the
    tensors the graph was captured on, nothing frozen at capture, and casts the student's weights again (a cast
    cached outside the graph would be the old weights'). A graph for each bucket length a model used at least
    CAPTURE_AT times, captured once (the second batch may need a bucket the first did not), and every forward after
    the prompt replayed but each bucket's first, its warm-up, which runs on a side stream."""
    student, teacher = pair(name)
    teacher.to(dtype)
    ids, attn = left_padded_batch()
    long = dict(eos=299, max_chunk=3)  # no row ends (24 tokens), catch-ups of 3 run padded to 4
    start = {k: v.clone() for k, v in student.state_dict().items()}
    out, runs, run = {}, [], M.Decoder.run

    def spied(self, *a, **kw):
        runs.append((self.mode, Stream.current.name))
        Stream.log.append(f"run on {Stream.current.name}")
        return run(self, *a, **kw)
    monkeypatch.setattr(M.Decoder, "run", spied)
    for decode in ("static", "graph"):
        M.release_decoders()
        student.load_state_dict(start)
        runs.clear()
        out[decode] = [rollouts(student, teacher, alpha, decode, (ids, attn), dtype=dtype, **long)]
        captured = len(cpu_graphs)
        with torch.no_grad():
            for p in student.parameters():  # a step of the student's optimizer, in place
                p.mul_(1.01)
        out[decode].append(rollouts(student, teacher, alpha, decode, (ids.flip(0), attn.flip(0)), dtype=dtype, **long))
        if decode == "graph":
            decs = {key[0]: d for key, d in M._decoders.items()}  # role -> decoder
            assert [d.mode for d in decs.values()] == ["graph", "graph"]  # no fall-back
            assert set(decs["student"].graphs) == {1}  # its one-token step
            for d in decs.values():  # a graph for each bucket used CAPTURE_AT times or more, and for no other
                assert set(d.graphs) == {n for n, k in d.uses.items() if k >= M.CAPTURE_AT} and set(d.uses) <= set(M.BUCKETS)
            assert captured >= 2 and len(cpu_graphs) == sum(len(d.graphs) for d in decs.values())  # each captured once
            # run (not replay): 2 prompts a batch; each bucket's first use (its warm-up), on a side stream; the
            # capture of each graph; no more
            assert Counter(runs) == {("graph", "main"): 2 * 2, ("graph", "capture"): len(cpu_graphs),
                                                      ("graph", "side"): sum(len(d.uses) for d in decs.values())}
            log = Stream.log  # each warm-up waits for the main stream's work, and the main stream for it
            assert all(log[i - 1:i + 2] == ["side waits for main", e, "main waits for side"]
                       for i, e in enumerate(log) if e == "run on side")
    assert not torch.equal(out["static"][1]["logp_student"], out["static"][0]["logp_student"].flip(0))  # it moved
    for first, second in zip(out["static"], out["graph"]):
        for k in KEYS:
            assert torch.equal(first[k], second[k]), k


def test_graph_mode_replays_a_filtered_mixture(cpu_graphs):
    """τ ≠ 1 and top-k: the per-token sampler, the teacher at every position, reads the student's logits again
    after the teacher's replay: static's rollouts, from two graphs (each model's one-token step)."""
    student, teacher = pair("llama")
    out = {}
    for decode in ("static", "graph"):
        M.release_decoders()
        out[decode] = rollouts(student, teacher, 0.2, decode, n=16, eos=299, temperature=0.9, top_k=5)
    assert [d.mode for d in M._decoders.values()] == ["graph", "graph"] and len(cpu_graphs) == 2
    for k in KEYS:
        assert torch.equal(out["static"][k], out["graph"][k]), k


@pytest.mark.parametrize("host_work,why", [
    (lambda h: h.abs().max().item(), "it reads a tensor on the host: aten::_local_scalar_dense"),  # seen in the warm-up
    (lambda h: torch.tensor([0.5]), "operation not permitted when stream is capturing (aten::lift_fresh)")])  # by capture
def test_a_forward_that_cannot_be_captured_decodes_statically(cpu_graphs, monkeypatch, capsys, host_work, why):
    """A model whose forward reads a tensor on the host, or brings one from it, cannot be captured: graph mode says so
    once and why, decodes that model statically from then on (the next collection's decoder is static from the
    start), and the rollouts are static decoding's. Each forward length is checked once in the process. A read seen by
    HostReads during the warm-up stops it before any capture; what HostReads lets through fails the capture, and the
    capture's error is the reason given."""
    student, teacher = pair("llama")
    block = teacher.model.layers[0]
    forward = block.forward

    def with_host_work(hidden, *a, **kw):  # a check, a log line, a constant built per call
        host_work(hidden)
        return forward(hidden, *a, **kw)
    monkeypatch.setattr(block, "forward", with_host_work)
    static = rollouts(student, teacher, 0.2, "static")
    checks, reads, graphed, graph_forward = [], M.HostReads, [], M.Decoder.graph_forward
    monkeypatch.setattr(M, "HostReads", lambda: checks.append(1) or reads())
    monkeypatch.setattr(M.Decoder, "graph_forward", lambda self, n: graphed.append(self.model) or graph_forward(self, n))
    for collection in range(2):  # the next collection: decoders made anew, the teacher static from the start
        M.release_decoders()
        graphed.clear()
        for batch in range(2):  # a second batch of the collection restarts the same two decoders
            graph = rollouts(student, teacher, 0.2, "graph")
            assert {key[0]: d.mode for key, d in M._decoders.items()} == {"student": "graph", "teacher": "static"}
            assert len(M._decoders) == 2  # one cache per model
            for k in KEYS:
                assert torch.equal(static[k], graph[k]), k
        assert (teacher in graphed) == (collection == 0)  # then it never tries a warm-up check or a capture again
        first = first if collection else len(checks)
    assert len(checks) == first  # the next collection checks no forward again
    # each length checked once, a flagged one the teacher's last
    assert first == len(M._checked[student]) + len(M._checked.get(teacher, ())) + why.startswith("it reads")
    err = capsys.readouterr().err
    assert err.count(f"decodes statically, without graphs: its forward could not be captured ({why})") == 1, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (gpu_check.py runs this test there)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decoding_replays_static_decoding_on_cuda(dtype):
    """On a GPU: the graph path replays exactly the static path's forwards, so the same seed gives the same tokens
    and the same recorded tensors (fp32 and bf16), and, in fp32, the eager ones to 1e-4. Twice in a row, so that the
    second batch replays graphs captured on the first."""
    student, teacher = pair("llama", device="cuda")
    if dtype == torch.bfloat16:
        teacher.to(dtype)
    ids, attn = (x.cuda() for x in left_padded_batch())
    out = {}
    for decode in ("static", "graph", "eager"):
        M.release_decoders()
        for _ in range(2):
            out[decode] = M.sample_rollouts(student, teacher, ids, attn, torch.tensor([3]), 0, 24, 0.2, dtype=dtype,
                                            generator=torch.Generator("cuda").manual_seed(7), decode=decode)
        if decode == "graph":  # both models captured (no fall-back to static), the student's step among them
            assert [d.mode for d in M._decoders.values()] == ["graph", "graph"]
            assert all(d.graphs for d in M._decoders.values()) and 1 in next(iter(M._decoders.values())).graphs
    for k in KEYS:
        torch.testing.assert_close(out["graph"][k].float(), out["static"][k].float(), atol=1e-5, rtol=0, msg=k)
        if dtype == torch.float32:
            torch.testing.assert_close(out["graph"][k].float(), out["eager"][k].float(), atol=1e-4, rtol=0, msg=k)
    M.release_decoders()
