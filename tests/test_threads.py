"""Threads sharing one model: each thread's captures, edits and generations are its own.

Every result computed in a thread is compared, exactly, with the same work done alone in one
thread. Forwards are made to overlap (a reader that sleeps at ``embed`` lets the other threads
run mid-forward), so a hook that served another thread's readers or edits would show.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actlab.engine.edits import AddVector, Replace
from tiny_models import tiny_model

N_THREADS, N_ITERS = 4, 5
SITE = "resid.1"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def texts_of(t: int) -> list[str]:
    """Each thread its own batch (its own lengths too, so a mixed capture cannot even match in shape)."""
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    return [" ".join(words[(t + j + k) % len(words)] for k in range(2 + t + j)) for j in range(2 + t % 2)]


def edit_of(model, t: int) -> AddVector:
    """Thread t's own steering edit at resid.0 (thread 0 gets none: it checks that others' edits stay out)."""
    g = torch.Generator().manual_seed(100 + t)
    return AddVector("resid.0", torch.randn(model.d_model, generator=g), coef=float(t))


def run_threads(fn, n: int = N_THREADS, timeout: float = 60.0) -> list:
    """fn(t) in n threads started together; their results in thread order, the first error re-raised."""
    results: list = [None] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(t: int) -> None:
        try:
            start.wait(timeout)
            results[t] = fn(t)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def slow_reader(site, h, state) -> None:
    time.sleep(0.002)  # releases the GIL mid-forward: the other threads run their forwards now


def captured(model, t: int, *, edited: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Thread t's unit of work: its capture of SITE and its logits, under its own edit."""
    with model.hooks.add_reader("embed", slow_reader), model.capture(SITE) as cap:
        if edited and t:
            with model.edit(edit_of(model, t)):
                logits = model(texts_of(t)).logits
        else:
            logits = model(texts_of(t)).logits
    return cap[SITE], logits


def test_captures_and_edits_stay_in_their_thread(llama):
    reference = [captured(llama, t) for t in range(N_THREADS)]
    plain = [captured(llama, t, edited=False) for t in range(N_THREADS)]
    for t in range(1, N_THREADS):
        assert not torch.equal(reference[t][1], plain[t][1]), "each thread's edit changes its own outputs"

    def work(t: int):
        return [captured(llama, t) for _ in range(N_ITERS)]

    for t, runs in enumerate(run_threads(work)):
        for acts, logits in runs:
            assert acts.shape == reference[t][0].shape
            assert torch.equal(acts, reference[t][0]), f"thread {t}: its capture holds another thread's pass"
            assert torch.equal(logits, reference[t][1]), f"thread {t}: another thread's edit reached it"
    assert not llama.hooks.active, "every reader and edit is gone once the threads end"


def test_edit_in_one_thread_leaves_plain_threads_alone(llama):
    """Thread 0 edits continuously; the others run plain forwards and must see the unedited model."""
    plain = {t: llama(texts_of(t)).logits for t in range(1, N_THREADS)}
    edited = llama.edit(edit_of(llama, 3))  # opened in the main thread: no worker thread sees it
    try:
        def work(t: int):
            out = []
            for _ in range(N_ITERS):
                if t == 0:
                    with llama.edit(edit_of(llama, 2)), llama.hooks.add_reader("embed", slow_reader):
                        out.append(llama(texts_of(2)).logits)
                else:
                    with llama.hooks.add_reader("embed", slow_reader):
                        out.append(llama(texts_of(t)).logits)
            return out

        results = run_threads(work)
    finally:
        edited.remove()
    with llama.edit(edit_of(llama, 2)):
        ref_edited = llama(texts_of(2)).logits
    assert all(torch.equal(x, ref_edited) for x in results[0]), "the editing thread sees its own edit"
    for t in range(1, N_THREADS):
        assert all(torch.equal(x, plain[t]) for x in results[t]), f"thread {t} saw another thread's edit"


def test_generate_in_threads_with_their_own_edits(llama):
    prompts = {t: texts_of(t)[:1] for t in range(N_THREADS)}

    def gen(t: int, seed: int | None = None):
        with llama.edit(edit_of(llama, t)), llama.hooks.add_reader("embed", slow_reader):
            return llama.generate(prompts[t], max_new_tokens=6, return_ids=True,
                                  do_sample=seed is not None, seed=seed)

    greedy = [gen(t) for t in range(N_THREADS)]
    sampled = [gen(t, seed=7 + t) for t in range(N_THREADS)]
    assert len({tuple(g.flatten().tolist()) for g in greedy}) > 1, "the edits change the continuations"

    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(run_threads(gen), greedy))
        both = run_threads(lambda t: gen(t, seed=7 + t))
        assert all(torch.equal(a, b) for a, b in zip(both, sampled)), "seeded sampling is reproducible in threads"


def test_generate_captures_stamp_their_own_thread(llama):
    """Captures stamp the input ids of their own thread's calls only (``to_batch`` token ids)."""
    def work(t: int):
        with llama.hooks.add_reader("embed", slow_reader), llama.capture(SITE) as cap:
            llama(texts_of(t))
        return cap.input_ids, cap.to_batch().token_ids

    ids = [llama.tokenize(texts_of(t))[0] for t in range(N_THREADS)]
    for t, (stamped, token_ids) in enumerate(run_threads(work)):
        assert torch.equal(stamped, ids[t])
        assert torch.equal(token_ids, ids[t][llama.tokenize(texts_of(t))[1].bool()])


def test_one_replace_object_shared_by_threads(llama):
    """A Replace keeps the input it saw per thread, so one object can serve several threads at once."""
    halve = Replace("mlp.1", lambda x: 0.5 * llama.hf.get_submodule(llama.sitemap["mlp.1"].module_path)(x))
    with llama.edit(halve):
        reference = [llama(texts_of(t)).logits for t in range(N_THREADS)]

    def work(t: int):
        with llama.edit(halve), llama.hooks.add_reader("embed", slow_reader):
            return [llama(texts_of(t)).logits for _ in range(3)]

    for t, runs in enumerate(run_threads(work)):
        assert all(torch.equal(x, reference[t]) for x in runs)


def test_prompt_length_and_state_are_per_thread(llama):
    seen = {}

    def work(t: int):
        with llama.hooks.prompt_length(10 + t):
            time.sleep(0.01)
            seen[t] = llama.hooks.state.prompt_length
        return llama.hooks.state.prompt_length

    assert run_threads(work) == [None] * N_THREADS
    assert seen == {t: 10 + t for t in range(N_THREADS)}


def test_registrations_churn_while_other_threads_capture(llama):
    """Threads adding and removing readers and edits at other sites never make a capture miss a pass."""
    sites = ["embed", "resid.0", "mlp.0", SITE, "resid.2", "attn.1", "final"]
    reference = {t: captured(llama, t) for t in range(2)}
    stop = threading.Event()

    def work(t: int):
        if t < 2:
            try:
                return [captured(llama, t) for _ in range(2 * N_ITERS)]
            finally:
                stop.set()
        n = 0
        while not stop.is_set():
            with llama.capture(sites[n % len(sites)]), llama.edit(edit_of(llama, t)):
                n += 1
            if n % 3 == 0:
                with llama.capture(sites[(n + 2) % len(sites)]):
                    llama([[5, 6, 7]])
        return n

    results = run_threads(work)
    for t in range(2):
        for acts, logits in results[t]:
            assert torch.equal(acts, reference[t][0]) and torch.equal(logits, reference[t][1])
    assert all(n > 0 for n in results[2:])
    assert not llama.hooks.active


def test_handle_opened_in_one_thread_removed_in_another(llama):
    ids = [[4, 5, 6, 7]]
    before = llama(ids).logits
    box = {}
    run_threads(lambda t: box.setdefault("h", llama.edit(edit_of(llama, 2))), n=1)
    assert torch.equal(llama(ids).logits, before), "another thread's edit stays out of this one"
    box["h"].remove()
    assert not llama.hooks.active


def test_capture_opened_in_another_thread_explains_itself(llama):
    from actlab.errors import ActlabError

    with llama.capture(SITE) as cap:
        run_threads(lambda t: llama(texts_of(1)), n=1)
    with pytest.raises(ActlabError, match="thread"):
        cap[SITE]


def test_threads_record_their_own_stores(llama, tmp_path):
    """Two threads recording different documents into two stores get the stores one thread would write;
    two threads recording into one store: one records it, the other is refused in one line."""
    from actlab.errors import ActlabError
    from actlab.store import record

    docs = {t: [" ".join(texts_of(t + k)) for k in range(6)] for t in range(2)}

    def rec(t: int, out):
        with llama.hooks.add_reader("embed", slow_reader):
            record(llama, docs[t], ["resid.0", "mlp.1"], out, shard_tokens=30, batch_size=2)

    for t in range(2):
        rec(t, tmp_path / f"ref{t}")
    run_threads(lambda t: rec(t, tmp_path / f"own{t}"), n=2)
    for t in range(2):
        names = sorted(p.name for p in (tmp_path / f"ref{t}").iterdir() if p.name != "manifest.json")
        assert len(names) > 1 and names == sorted(p.name for p in (tmp_path / f"own{t}").iterdir()
                                                  if p.name != "manifest.json")
        assert all((tmp_path / f"ref{t}" / n).read_bytes() == (tmp_path / f"own{t}" / n).read_bytes() for n in names)

    def same(t: int):
        try:
            rec(0, tmp_path / "shared")
        except ActlabError as e:
            return str(e)

    outcomes = run_threads(same, n=2)
    assert sorted(o is None for o in outcomes) == [False, True], outcomes
    refused = next(o for o in outcomes if o)
    assert "shared" in refused and "\n" not in refused, refused
    names = sorted(p.name for p in (tmp_path / "ref0").iterdir() if p.name != "manifest.json")
    assert all((tmp_path / "shared" / n).read_bytes() == (tmp_path / "ref0" / n).read_bytes() for n in names)


def test_overlapping_frozen_weights_restore_the_flags():
    """Two overlapping (not nested) frozen_weights blocks, as two training threads make them: the
    weights stay frozen while either is open and get their own flags back when both have closed."""
    from actlab.engine.grad import frozen_weights
    from tiny_models import tiny_model

    m = tiny_model("llama")
    params = list(m.hf.parameters())
    params[0].requires_grad_(False)  # one weight the user froze on purpose stays frozen
    wanted = [p.requires_grad for p in params]
    first, second = frozen_weights(m), frozen_weights(m)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first to open closes first
    assert not any(p.requires_grad for p in params)
    second.__exit__(None, None, None)
    assert [p.requires_grad for p in params] == wanted
