"""Constrained and infill decoding: the canvas DP against brute force on tiny vocabularies, compile errors, and
property tests (hypothesis) on a random model: every output matches its regex / schema / choice / template."""

from __future__ import annotations

import itertools
import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma.checkpoint.load import load_model
from dgemma.constraints import Constraint, ConstraintError, Template, compile_constraint
from dgemma.constraints.automaton import TokenAutomaton
from dgemma.constraints.compile import regex_edges
from dgemma.constraints.dp import ClassScorer, ClassScores, best_canvas, class_max, class_scores, plan_canvas
from dgemma.constraints.numbers import integer_range, number_range
from dgemma.constraints.schema import CompileLimits
from dgemma.constraints.vocab import TokenTable
from dgemma.generate import Done, Draft, generate, stream
from dgemma.checkpoint.write import write_random_checkpoint

PAD, EOS = 0, 1
PIECES = (None, None, b"a", b"b", b"ab", b"ba", b"c", b"bc")  # ids 0 (pad), 1 (EOS), then text tokens


def _aut(regex: str) -> TokenAutomaton:
    table = TokenTable(PIECES, "test:" + regex)
    e = regex_edges(regex, table, frozenset({PAD, EOS}))
    return TokenAutomaton.build(e.src, e.tok, e.dst, e.n_states, e.start, e.finals, len(PIECES), [EOS], PAD)


def _text(ids) -> str:
    return b"".join(PIECES[i] for i in ids).decode()


def _valid(canvas: tuple[int, ...], regex: str, left: int) -> bool:
    """Independent oracle (Python's re): before EOS only text tokens, after it only pad, EOS within the budget;
    a canvas without EOS must be a prefix of a match finishable within the budget (continuations searched)."""
    c = len(canvas)
    if EOS in canvas:
        k = canvas.index(EOS)
        head, tail = canvas[:k], canvas[k + 1:]
        return (k < left and all(PIECES[t] for t in head) and all(t == PAD for t in tail)
                and re.fullmatch(regex, _text(head)) is not None)
    if not all(PIECES[t] for t in canvas) or left - c < 1:
        return False
    text_ids = [i for i, p in enumerate(PIECES) if p]
    for n in range(0, min(left - c - 1, 3) + 1):
        for more in itertools.product(text_ids, repeat=n):
            if re.fullmatch(regex, _text(canvas + more)):
                return True
    return False


@pytest.mark.parametrize("regex", ["(ab|c)+a?", "a*b(c|ba)", "[abc]{2,3}", "b?", "(a|bc)(ba)*"])
@pytest.mark.parametrize("budget", [3, 4, 6])
def test_dp_is_the_best_valid_canvas(regex, budget):
    aut = _aut(regex)
    c, v = 4, len(PIECES)
    left = (budget - torch.arange(c + 1)).clamp(min=0)
    g = torch.Generator().manual_seed(len(regex) * 31 + budget)
    canvases = list(itertools.product(range(v), repeat=c))
    valid = [x for x in canvases if _valid(x, regex, budget)]
    for _ in range(4):
        probs = torch.softmax(torch.randn(c, v, generator=g) * 2, dim=-1)
        path = best_canvas(class_scores(probs, aut), aut, aut.start, left)
        chunked = ClassScorer(aut, c)  # as the sampler's fused pass feeds it: one chunk of positions at a time
        for j in range(c):
            chunked(j, probs[j:j + 1])
        assert torch.equal(chunked.scores(probs).logp, class_scores(probs, aut).logp)
        q = probs.index_select(1, aut.layout.order)  # the accelerator path (scatter_reduce) agrees with numpy's
        assert torch.equal(class_max(q, aut.layout, True), class_max(q, aut.layout, False))
        for k in range(aut.n_classes):  # each class's score is its best member's log-probability
            members = (aut.token_class == k).nonzero().flatten()
            assert torch.allclose(class_scores(probs, aut).logp[:, k], probs[:, members].max(dim=1).values.log())
        plan = plan_canvas(aut, aut.start, left)
        hinted = best_canvas(chunked.scores(probs), aut, aut.start, left, plan, argmax=probs.argmax(dim=-1))
        assert hinted.argmax.tolist() == path.argmax.tolist()
        logp = probs.log()
        score = lambda x: float(sum(logp[j, t] for j, t in enumerate(x)))  # noqa: E731
        if not valid:  # nothing fits: the best valid prefix over the budget's positions, no EOS
            assert not path.complete and EOS not in path.argmax.tolist()
            continue
        got = tuple(path.argmax.tolist())
        assert path.complete and got in valid, (regex, budget, got)
        assert score(got) == pytest.approx(max(score(x) for x in valid), abs=1e-5)


def test_shorthand_classes_are_ascii():
    from dgemma.constraints.compile import ascii_classes

    assert ascii_classes(r"\d+\.[\w-]\\d\S") == r"[0-9]+\.[[0-9A-Za-z_]-]\\d[^\t\n\v\f\r ]"


def test_token_classes_group_equal_tokens():
    aut = _aut("[ab]{2,3}")  # a and b behave alike, ab and ba too (two characters); c and bc never occur
    tc = aut.token_class.tolist()
    assert tc[2] == tc[3] and tc[4] == tc[5] and tc[2] != tc[4]
    assert tc[6] == tc[7] == -1
    assert aut.min_tokens == 2  # "ab" and EOS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-constraints")
    write_random_checkpoint(path, "tiny", seed=3)
    m = load_model(path)
    m.generation_config = m.generation_config.replace(max_denoising_steps=3)  # validity does not need steps
    return m


def test_compile_errors_name_the_problem(model):
    tok, v = model.tokenizer, model.config.vocab_size
    with pytest.raises(ConstraintError, match="cannot be compiled"):
        compile_constraint(Constraint.regex("a("), tok, v, [1], 0)
    with pytest.raises(ConstraintError, match="cannot be compiled"):
        compile_constraint(Constraint.regex("[^\\s\\S]"), tok, v, [1], 0)
    with pytest.raises(ConstraintError, match="not a valid JSON schema"):
        Constraint.json_schema({"type": "nope"})
    with pytest.raises(ConstraintError, match="non-empty list"):
        Constraint.choice([])
    with pytest.raises(ConstraintError, match="no hole"):
        Constraint.infill("just text")
    with pytest.raises(ConstraintError, match="one of regex"):
        Constraint.from_args(regex="a", choice=["a"])
    a = compile_constraint(Constraint.regex("^x+$"), tok, v, [1], 0)  # anchors are implied
    assert a is compile_constraint(Constraint.regex("x+"), tok, v, [1], 0)  # cached


@given(lo=st.none() | st.integers(-3000, 3000), hi=st.none() | st.integers(-3000, 3000))
@settings(max_examples=40, deadline=None)
def test_integer_range_regex(lo, hi):
    rx = integer_range(lo, hi)
    for v in range(-3100, 3101, 7):
        inside = (lo is None or v >= lo) and (hi is None or v <= hi)
        assert (rx is not None and re.fullmatch(rx, str(v)) is not None) == inside, (lo, hi, v)
    for bad in ("-0", "01", "+1", ""):
        assert rx is None or not re.fullmatch(rx, bad)


@given(lo=st.floats(-50, 50), hi=st.floats(-50, 50), x=st.floats(-60, 60), digits=st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_number_range_regex_admits_only_numbers_in_bounds(lo, hi, x, digits):
    rx = number_range({"minimum": lo, "maximum": hi}, integer=False)
    text = f"{x:.{digits}f}"
    if rx is not None and re.fullmatch(rx, text):
        assert lo <= float(text) <= hi


def test_verifier_keywords_are_refused_where_no_verifier_runs():
    """A template hole has no verifier: keywords only the verifier holds are refused there, naming keyword and
    path; what the regex holds exactly (multipleOf as a list of multiples) compiles."""
    for schema, keyword, path in (({"type": "array", "uniqueItems": True}, "uniqueItems", "/"),
                                  ({"properties": {"a": {"not": {"type": "string"}}}}, "not", "/properties/a")):
        with pytest.raises(ConstraintError,
                           match=f"keyword '{keyword}' \\(at {path}\\) is held by the output verifier"):
            Constraint.json_schema(schema).regex_text()
    assert re.fullmatch(Constraint.json_schema({"type": "integer", "multipleOf": 3}).regex_text(), "-9")
    with pytest.raises(ConstraintError, match="unsatisfiable: no integer"):
        Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 2}).regex_text()


# -- random regexes and schemas -----------------------------------------------------------------------------------
ATOMS = st.sampled_from(["a", "b", "xy", "[0-9]", "[a-c]", "\\.", " ", "é", "(ab|cd)", "[A-Z]", "\\d", "\\w", "\\s",
                         "[\\d.]", "."])


@st.composite
def regexes(draw, depth=2):
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        atom = draw(ATOMS) if depth == 0 or draw(st.booleans()) else "(" + draw(regexes(depth=depth - 1)) + ")"
        rep = draw(st.sampled_from(["", "?", "*", "+", "{2}", "{1,3}"]))
        parts.append(atom + rep)
    alt = draw(st.booleans()) and depth > 0
    return "|".join(parts) if alt else "".join(parts)


@given(regex=regexes(), seed=st.integers(0, 2**31))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_regexes_always_match(model, regex, seed):
    try:  # nested counted repeats of `.` can take seconds: refused past the compile limit, never a hang
        compile_constraint(Constraint.regex(regex), model.tokenizer, model.config.vocab_size, [1, 5], 0,
                           CompileLimits(seconds=3))
    except ConstraintError as e:
        assert "s to compile" in str(e), str(e)
        return
    r = _generate_or_cut(model, "Q:", seed, 40, Constraint.regex(regex), regex=regex)
    if r is not None:
        assert re.fullmatch(regex, r.text), (regex, r.text)


def _generate_or_cut(model, prompt: str, seed: int, budget: int, constraint: Constraint, **kw):
    """Generate with the constraint keywords `kw` (the same constraint as `constraint`). When no accepted output
    fits the budget, check the cut for length (never a false stop) and return None; else the result, which must
    have stopped at EOS."""
    aut = compile_constraint(constraint, model.tokenizer, model.config.vocab_size, [1, 5], 0)
    r = generate(model, model.tokenizer.encode(prompt), seed=seed, max_new_tokens=budget, **kw)
    if aut.min_tokens > budget:
        assert r.finish_reason == "length" and len(r.ids) == budget
        return None
    assert r.finish_reason == "eos", (kw, r.text)
    return r


SCALARS = st.sampled_from([{"type": "integer"}, {"type": "boolean"}, {"type": "string", "maxLength": 4},
                           {"type": "number"}, {"enum": ["red", "green", 3]}, {"type": "string", "pattern": "[a-z]{2}"},
                           {"type": "null"}, {"type": "integer", "minimum": -5, "maximum": 120},
                           {"type": "integer", "exclusiveMinimum": 9}, {"type": "number", "minimum": 0.5, "maximum": 3},
                           {"type": ["integer", "null"], "maximum": -10}])


@st.composite
def schemas(draw, depth=2):
    names = draw(st.lists(st.sampled_from(["id", "name", "ok", "tags", "sub"]), min_size=1, max_size=3, unique=True))
    props = {}
    for n in names:
        kind = draw(st.integers(0, 2 if depth else 0))
        if kind == 1:
            lo = draw(st.integers(0, 2))
            props[n] = {"type": "array", "items": draw(SCALARS), "minItems": lo,
                        "maxItems": lo + draw(st.integers(0, 2))}
        elif kind == 2:
            props[n] = draw(schemas(depth=depth - 1))
        else:
            props[n] = draw(SCALARS)
    return {"type": "object", "properties": props, "required": names, "additionalProperties": False}


@given(schema=schemas(), seed=st.integers(0, 2**31))
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_schemas_always_validate(model, schema, seed):
    r = _generate_or_cut(model, "JSON:", seed, 128, Constraint.json_schema(schema), json_schema=schema)
    if r is not None:
        jsonschema.validate(json.loads(r.text), schema)


@given(seed=st.integers(0, 2**31))
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_choice(model, seed):
    options = ["yes", "no", "not sure", "n/a (see {x})"]
    r = generate(model, model.tokenizer.encode("?"), seed=seed, max_new_tokens=32, choice=options)
    assert r.finish_reason == "eos" and r.text in options


def test_too_short_a_budget_ends_for_length_with_a_valid_prefix(model):
    r = generate(model, [5, 6], seed=0, max_new_tokens=6, regex="[a-z]{10}")
    assert r.finish_reason == "length" and re.fullmatch("[a-z]{6}", r.text)


def test_mixed_batch_leaves_unconstrained_rows_untouched(model):
    prompts = [[7, 8, 9], [10, 11, 12]]
    batch = generate(model, prompts, seed=5, max_new_tokens=40, constraint=[Constraint.regex("[0-9]+"), None])
    alone = generate(model, prompts[1], seed=6, max_new_tokens=40)
    assert re.fullmatch("[0-9]+", batch[0].text)
    assert batch[1].ids == alone.ids and batch[1].steps == alone.steps


# -- infill ----------------------------------------------------------------------------------------------------------
def test_infill_clamps_fixed_tokens_every_step_across_canvases(model):
    tok = model.tokenizer
    head, mid, tail = "Dear customer number ", ", your order of ", " units ships today. Regards!"
    template = Template.parse(head + "{{hole:6:[0-9]+}}" + mid + "{{hole:3}}" + tail)
    ids_head, ids_mid, ids_tail = tok.encode(head), tok.encode(mid), tok.encode(tail)
    fixed = {i: t for i, t in enumerate(ids_head)}
    at = len(ids_head) + 6
    fixed.update({at + i: t for i, t in enumerate(ids_mid)})
    at += len(ids_mid) + 3
    fixed.update({at + i: t for i, t in enumerate(ids_tail)})
    c = model.config.canvas_length
    assert max(fixed) >= 2 * c  # the template spans three canvases
    for seed in range(2):
        drafts = 0
        for ev in stream(model, tok.encode("Letter:"), seed=seed, max_new_tokens=96, template=template):
            if isinstance(ev, Draft):
                drafts += 1
                for pos, t in fixed.items():
                    if pos // c == ev.canvas_index:  # the input canvas holds every fixed token, every step
                        assert int(ev.canvas[0, pos % c]) == t and int(ev.argmax[0, pos % c]) == t
            elif isinstance(ev, Done):
                res = ev.results[0]
        assert drafts > 0 and res.finish_reason == "eos"
        assert all(res.ids[p] == t for p, t in fixed.items())
        m = re.fullmatch(re.escape(head) + "[0-9]{6}" + re.escape(mid) + "(.+)" + re.escape(tail), res.text, re.S)
        assert m and len(m.group(1).encode()) == 3  # byte tokens: a 3-token hole holds 3 bytes of UTF-8


def test_infill_bounded_holes_and_schema_hole(model):
    parts = ["name=", {"min_tokens": 1, "max_tokens": 5, "regex": "[a-z]+"}, "; data=",
             {"min_tokens": 2, "max_tokens": 40, "json_schema": {"type": "array", "items": {"type": "integer"},
                                                                  "maxItems": 3}}, ";"]
    for seed in range(3):
        r = generate(model, [5, 6, 7], seed=seed, max_new_tokens=64, template=parts)
        m = re.fullmatch(r"name=([a-z]{1,5}); data=(.*);", r.text, re.S)
        assert r.finish_reason == "eos" and m, r.text
        assert isinstance(json.loads(m.group(2)), list)


def test_cli_flags(model, tmp_path, capsys):
    from dgemma.cli import main

    path = tmp_path / "ckpt"
    write_random_checkpoint(path, "tiny", seed=4)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
                                  "required": ["n"]}))
    common = ["generate", "--model", str(path), "--prompt", "hi", "--seed", "1", "--max-denoising-steps", "2",
              "--json", "--stats", "--max-new-tokens", "40"]
    assert main([*common, "--json-schema", f"@{schema}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "eos" and json.loads(out["text"])["n"] <= 9
    assert main([*common, "--choice", "left", "--choice", "right"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] in ("left", "right")
    assert main([*common, "--template", "x={{hole:2:[0-9]+}};"]) == 0
    assert re.fullmatch("x=[0-9]{2};", json.loads(capsys.readouterr().out)["text"])
    assert main([*common, "--regex", "a("]) == 2
    assert "unbalanced parentheses" in capsys.readouterr().err


def test_reference_sampler_and_batches(model):
    regex = r"\[[0-9]{1,3}(,[0-9]{1,3}){0,3}\]"
    rows = generate(model, [[5, 6], [7, 8, 9]], seed=1, max_new_tokens=40, rng="reference", regex=regex)
    assert all(r.finish_reason == "eos" and re.fullmatch(regex, r.text) for r in rows)


@pytest.mark.parametrize("rng", ["fast", "reference"])
def test_class_scores_from_the_samplers_pass(model, rng):
    """The scores the sampler's own pass hands the DP (`visit`, chunk by chunk, without a second read of [C, V])
    equal each class's max over the step distribution the sampler drew from, for both strategies."""
    from dgemma.kv_cache import KVCache
    from dgemma.sampler import FastSampler, ReferenceSampler

    aut = compile_constraint(Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}),
                             model.tokenizer, model.config.vocab_size, [1], 0)
    c, v = model.config.canvas_length, model.config.vocab_size
    sampler = FastSampler(model.module, [3, 4]) if rng == "fast" else ReferenceSampler(model.module, 3)
    live = torch.ones(2, dtype=torch.bool)
    canvas = sampler.init_canvas(live)
    cache = KVCache(model.config, 2, 64, device=model.device, dtype=model.dtype)
    model.module.encode(torch.tensor([[5, 6, 7], [8, 9, 10]]), cache)
    hidden = model.module.decode_hidden(canvas, cache)
    scorer = ClassScorer(aut, c)
    temp = torch.tensor(0.7)
    sampler.step(hidden, canvas, live, temp, visit={1: scorer})
    raw = model.module.lm_head(hidden[1]).float() / temp  # the softcapped, temperature-scaled logits of row 1
    probs = torch.softmax(raw, dim=-1)
    members = [(aut.token_class == k).nonzero().flatten() for k in range(aut.n_classes)]
    expect = torch.stack([probs[:, m].max(dim=1).values for m in members], dim=1)
    assert torch.allclose(scorer.maxp, expect, rtol=1e-5, atol=1e-9)
    assert probs.shape == (c, v) and scorer.maxp.abs().sum() > 0


def test_big_class_scoring_and_best_token_are_exact():
    """At a realistic vocabulary one class holds most tokens (a JSON string's content): on CPU its score is the row
    max of the probabilities times its 0/1 mask and its best token is read with the other tokens masked out; both
    equal the max / the lowest-id argmax over its members (one-hot rows and bf16 ties included)."""
    from dgemma.bench.constrained import synthetic_tokenizer

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"]}
    aut = compile_constraint(Constraint.json_schema(schema), synthetic_tokenizer(8192), 8192, [1], 0)
    assert aut.layout.big.size == 1
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(40, 8192, generator=g) * 4, dim=-1)
    probs[3] = 0.0
    probs[3, 300] = 1.0
    scorer = ClassScorer(aut, 40)
    for s in range(0, 40, 7):
        scorer(s, probs[s:s + 7])
    members = [aut.order[aut.offsets[k]:aut.offsets[k + 1]] for k in range(aut.n_classes)]
    assert torch.equal(scorer.maxp, torch.stack([probs[:, m].amax(dim=1) for m in members], dim=1))
    ranking = probs.to(torch.bfloat16)  # coarse: many tokens of a class tie
    big = int(aut.layout.big[0])
    classes = torch.where(torch.arange(40) % 3 == 0, torch.randint(0, aut.n_classes, (40,), generator=g), big)
    best = ClassScores(torch.log(scorer.maxp), ranking).best(aut, classes)
    for j, k in enumerate(classes.tolist()):
        vals = ranking[j, members[k]].float()
        assert int(best[j]) == int(members[k][int((vals == vals.max()).nonzero()[0])]), j


def _sentencepiece_style_tokenizer():
    """Gemma's tokenizer.json layout in small: byte-fallback pieces <0xNN>, words with ▁ for a space, Replace +
    ByteFallback + Fuse decoder."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HF

    from dgemma.tokenizer import BYTE_SPECIALS, Tokenizer

    vocab = {t: i for i, t in enumerate(BYTE_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": 6 + b for b in range(256)})
    for w in ["▁", "▁the", "▁cat", "▁sat", "the", "cat", "at", "▁a", "é", "▁é", '{"', '":', "12", "▁1"]:
        vocab.setdefault(w, len(vocab))
    tok = HF(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
    return Tokenizer(tok, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})


def test_sentencepiece_style_vocabulary(tmp_path):
    from dgemma.constraints.vocab import token_table
    from dgemma.tokenizer import save_tokenizer

    path = tmp_path / "sp"
    write_random_checkpoint(path, "tiny", seed=5, vocab_size=300)
    tok = _sentencepiece_style_tokenizer()
    save_tokenizer(tok, path)
    m = load_model(path)
    m.generation_config = m.generation_config.replace(max_denoising_steps=2)
    table = token_table(m.tokenizer, 300)
    for i in range(300):  # every text token's bytes are what the tokenizer decodes it to
        if table.pieces[i] is not None and table.pieces[i].decode("utf-8", "ignore") == table.pieces[i].decode(
                "utf-8", "replace"):
            assert table.pieces[i].decode() == m.tokenizer.decode([i])
    assert table.pieces[6 + 0x41] == b"A" and table.pieces[m.tokenizer.token_to_id("▁the")] == b" the"
    for seed in range(3):
        r = m.generate([2, 3], seed=seed, max_new_tokens=48, regex=r"(the|a) (cat|sat|é) [0-9]{1,3}\.")
        assert r.finish_reason == "eos" and re.fullmatch(r"(the|a) (cat|sat|é) [0-9]{1,3}\.", r.text), r.text
        schema = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 10}}, "required": ["x"]}
        r = m.generate([2, 3], seed=seed, max_new_tokens=48, json_schema=schema)
        jsonschema.validate(json.loads(r.text), schema)


def test_template_parsing():
    parts = Template.parse('{"k": {{hole:1-4:[0-9]{1,2}}}, "s": {{hole:3}}}{{hole}}').parts
    assert (parts[0] == '{"k": ' and parts[1].regex == "[0-9]{1,2}"
            and (parts[1].min_tokens, parts[1].max_tokens) == (1, 4))
    assert parts[2] == ', "s": ' and (parts[3].min_tokens, parts[3].max_tokens, parts[3].regex) == (3, 3, None)
    assert parts[4] == "}" and (parts[5].min_tokens, parts[5].max_tokens) == (1, None)
    with pytest.raises(ConstraintError, match="malformed hole"):
        Template.parse("x {{hole:3")


# -- real-world schemas: exact or refused ------------------------------------------------------------------------------
@pytest.mark.parametrize("schema,keyword,path", [
    ({"type": "string", "pattern": "(?=a)ab"}, "pattern", "/"),  # look-around
    ({"properties": {"s": {"type": "string", "pattern": "a\\bb"}}}, "pattern", "/properties/s"),  # \b inside
    ({"$ref": "https://example.com/other.json"}, "$ref", "/"),  # outside the schema
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "$ref", "/properties/a"),
    ({"allOf": [{"type": "string", "pattern": "^a+$"}, {"type": "string", "pattern": "^b+$"}]}, "allOf", "/allOf/1"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"], "additionalProperties": False},
     "required", "/"),
    # the issue's case: every oneOf branch excludes a required property
    ({"type": "object", "required": ["x"], "oneOf": [{"properties": {"y": {}}, "additionalProperties": False},
                                                     {"properties": {"z": {}}, "additionalProperties": False}]},
     "oneOf", "/"),
    ({"type": "array", "items": {"enum": [1, 2]}, "minItems": 3, "uniqueItems": True}, "uniqueItems", "/"),
    ({"type": "object", "properties": {"v": {"type": "string", "minLength": 5, "maxLength": 2}}, "required": ["v"]},
     "minLength", "/properties/v"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "type", "/allOf/1"),
    ({"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 6}, "multipleOf", "/"),
])
def test_schemas_no_output_could_hold_are_refused_naming_keyword_and_path(schema, keyword, path):
    with pytest.raises(ConstraintError) as e:
        Constraint.json_schema(schema).regex_text()
    assert repr(keyword) in str(e.value) and f"(at {path})" in str(e.value), str(e.value)


def _instances(schema, texts):
    rx = Constraint.json_schema(schema).regex_text()
    return [t for t in texts if re.fullmatch(rx, t)]


def test_draft4_boolean_exclusive_bounds():
    d4 = {"$schema": "http://json-schema.org/draft-04/schema#"}
    schema = {**d4, "type": "integer", "minimum": 5, "exclusiveMinimum": True, "maximum": 8, "exclusiveMaximum": True}
    assert _instances(schema, [str(i) for i in range(0, 12)]) == ["6", "7"]
    schema = {**d4, "type": "integer", "minimum": 5, "exclusiveMinimum": False, "maximum": 6}
    assert _instances(schema, [str(i) for i in range(0, 12)]) == ["5", "6"]


def test_formats_are_exact_subsets():
    import datetime

    good = ['"2024-02-28T13:05:09Z"', '"1999-12-01T00:00:00.5+05:30"']
    bad = ['"2024-02-30T13:05:09Z"', '"2024-13-01T00:00:00Z"', '"2024-01-01T00:00:00"', '"02024-01-01T00:00:00Z"',
           '"2024-01-01t00:00:00Z"']
    assert _instances({"type": "string", "format": "date-time"}, good + bad) == good
    for text in good:
        datetime.datetime.fromisoformat(json.loads(text).replace("Z", "+00:00"))
    assert _instances({"type": "string", "format": "ipv4"}, ['"10.0.0.255"', '"256.1.1.1"', '"1.2.3"']) == \
        ['"10.0.0.255"']


def test_anchored_patterns_and_annotation_only_subschemas():
    schema = {"type": "object", "properties": {"v": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+$"},
                                               "note": {"description": "anything"}},
              "required": ["v", "note"], "additionalProperties": False}
    rx = Constraint.json_schema(schema).regex_text()
    assert re.fullmatch(rx, '{"v":"1.25","note":3}')
    assert not re.fullmatch(rx, '{"v":"1","note":3}')


@pytest.mark.parametrize("seed", [0, 1])
def test_generated_instances_of_patterned_and_formatted_schemas_validate(model, seed):
    schema = {"type": "object", "properties": {
        "when": {"type": "string", "format": "date"}, "tag": {"type": "string", "pattern": "^[a-z]{2}-[0-9]$"},
        "kind": {"oneOf": [{"const": "a"}, {"const": "b"}]}}, "required": ["when", "tag", "kind"],
        "additionalProperties": False}
    r = _generate_or_cut(model, "JSON:", seed, 128, Constraint.json_schema(schema), json_schema=schema)
    if r is not None:
        jsonschema.validate(json.loads(r.text), schema)
