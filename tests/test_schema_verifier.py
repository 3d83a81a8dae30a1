"""JSON schemas beyond what a regex holds: the verifier (constraints/verify.py) on the decoded canvas, the exact
rewritings (allOf, if/then/else, oneOf, $ref, multipleOf, patternProperties, formats, patterns with JSON escaping),
refusals naming keyword and path, and bounded compilation. Random tiny model, so validity never depends on the
model; the committed JSONSchemaBench sample is read from benchmarks/ (no network)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma.checkpoint.load import load_model
from dgemma.checkpoint.write import write_random_checkpoint
from dgemma.constraints import Constraint, ConstraintError, compile_constraint
from dgemma.constraints.schema import CompileLimits, compile_schema
from dgemma.constraints.verify import SchemaCheck, scan
from dgemma.generate import generate

SAMPLE = Path(__file__).parents[1] / "benchmarks" / "jsonschemabench" / "sample.json"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-schema-verifier")
    write_random_checkpoint(path, "tiny", seed=3)
    m = load_model(path)
    m.generation_config = m.generation_config.replace(max_denoising_steps=4)
    return m


def _validator(schema):
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=jsonschema.FormatChecker())


def _generate_valid(model, schema, seed: int, budget: int = 192):
    r = generate(model, model.tokenizer.encode("JSON:"), seed=seed, max_new_tokens=budget, json_schema=schema)
    assert r.finish_reason == "eos", (schema, r.text)
    errors = [e.message for e in _validator(schema).iter_errors(json.loads(r.text))]
    assert not errors, (schema, r.text, errors)
    return json.loads(r.text)


# -- the verifier itself -------------------------------------------------------------------------------------------
def test_scan_marks_finished_values_and_their_spans():
    data = b'{"a":[1,2,"x"],"b":12'
    root = scan(data)
    assert not root.done and root.value == {"a": [1, 2, "x"]}  # only finished members
    a = root.at(["a"])
    assert a.done and data[a.start:a.end] == b'[1,2,"x"]'
    assert not root.at(["b"]).done  # 12 may go on
    assert scan(data, complete=False).at(["b"]).value is None
    assert scan(b"12", complete=True).done and scan(b"12", complete=True).value == 12


def test_offending_spans_point_at_what_breaks_the_schema():
    check = SchemaCheck({"type": "array", "uniqueItems": True}, (("", "uniqueItems"),))
    data = b'[1,"a",1,'
    (span,) = check.offending(data, False)  # the array is unfinished, but duplicates only get worse
    assert data[span[0]:span[1]] == b"1" and span[0] == 7  # the later duplicate
    props = SchemaCheck({"type": "object", "minProperties": 2}, (("", "minProperties"),))
    assert props.offending(b'{"a":1', False) == []  # unfinished: more may come
    (span,) = props.offending(b'{"a":1}', True)
    assert span == (6, 7)  # the closing brace: the object must go on
    assert props.offending(b'{"a":1', True) is None  # not one JSON value


def test_an_unchanged_output_is_not_validated_again(monkeypatch):
    """The verifier remembers its last answers: a canvas that did not change since the last step is not scanned
    and validated again (the answer is the same, and a caller may not alter the one it keeps)."""
    check = SchemaCheck({"type": "array", "uniqueItems": True}, (("", "uniqueItems"),))
    calls = []
    real = check._offending
    monkeypatch.setattr(check, "_offending", lambda data, complete: calls.append(data) or real(data, complete))
    first = check.offending(b"[1,2,1", False)
    first.append((0, 0))
    assert check.offending(b"[1,2,1", False) == [(5, 6)] and len(calls) == 1
    assert check.offending(b"[1,2,1]", True) == [(5, 6)] and check.offending(b"[1,2]", True) == []
    assert check.offending(bytearray(b"[1,2,1"), False) == [(5, 6)] and len(calls) == 3
    for i in range(20):  # a bounded memory
        check.offending(b"[%d]" % i, True)
    assert len(check.memo) <= 8


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"enum": ["a", "b", "c", "d"]}, "minItems": 3, "uniqueItems": True},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "minItems": 2, "maxItems": 4,
     "uniqueItems": True},
    {"type": "object", "properties": {"x": {"type": "integer", "minimum": -3, "maximum": 3}}, "required": ["x"],
     "not": {"properties": {"x": {"const": 0}}}},
    {"type": "object", "additionalProperties": {"type": "boolean"}, "minProperties": 2, "maxProperties": 3},
    {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}, "b": {"type": "string",
     "maxLength": 3}}, "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
    {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "integer", "minimum": 5, "maximum": 20}]},
    {"type": "object", "properties": {"p": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 4}},
     "required": ["p"]},
    {"type": "object", "properties": {"card": {"type": "boolean"}, "cvv": {"type": "integer", "minimum": 100,
     "maximum": 999}}, "required": ["card"], "dependentRequired": {"card": ["cvv"]}},
])
def test_verifier_keywords_validate(model, schema, seed):
    _generate_valid(model, schema, seed)


# -- exact rewritings ----------------------------------------------------------------------------------------------
def test_if_then_else_on_a_discriminator_compiles_exactly():
    schema = {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "v": {"type": "integer"}},
              "required": ["kind", "v"], "if": {"properties": {"kind": {"const": "a"}}},
              "then": {"properties": {"v": {"minimum": 5}}}, "else": {"properties": {"v": {"maximum": -5}}}}
    c = compile_schema(json.dumps(schema))
    assert c.checks == []  # nothing left to the verifier
    for text, ok in (('{"kind":"a","v":7}', True), ('{"kind":"a","v":-7}', False), ('{"kind":"b","v":-7}', True),
                     ('{"kind":"b","v":7}', False)):
        assert bool(re.fullmatch(c.regex, text)) == ok, text


def test_allof_merges_and_oneof_by_required_names_is_exclusive():
    schema = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "string", "maxLength": 2}}, "required": ["b"]}]}
    rx = compile_schema(json.dumps(schema)).regex
    assert re.fullmatch(rx, '{"a":1,"b":"x"}') and not re.fullmatch(rx, '{"a":1}')
    one = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
           "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}
    c = compile_schema(json.dumps(one))
    assert c.checks == []
    assert re.fullmatch(c.regex, '{"a":1}') and re.fullmatch(c.regex, '{"b":1}')
    assert not re.fullmatch(c.regex, '{"a":1,"b":2}')  # both would match two branches


def test_recursive_refs_are_cut_at_a_bound():
    schema = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0,
              "maximum": 9}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"],
              "additionalProperties": False}}, "$ref": "#/$defs/node"}
    rx = compile_schema(json.dumps(schema)).regex
    assert re.fullmatch(rx, '{"v":1,"kids":[{"v":2,"kids":[]}]}')
    assert not re.fullmatch(rx, '{"v":1,"kids":[{"v":2,"kids":[{"v":3}]}]}')  # deeper than the bound


def test_multiple_of_compiles_to_values_jsonschema_accepts():
    for schema in ({"type": "integer", "multipleOf": 7, "minimum": 10}, {"type": "number", "multipleOf": 0.01,
                   "maximum": 5}, {"type": "number", "multipleOf": 0.5}):
        rx = compile_schema(json.dumps(schema)).regex
        values = [str(x) for x in range(-20, 40)] + [f"{x / 100:.2f}" for x in range(-300, 600, 7)]
        matched = [v for v in values if re.fullmatch(rx, v)]
        assert matched and all(_validator(schema).is_valid(json.loads(v)) for v in matched), schema


def test_pattern_properties_and_required_names_from_them():
    schema = {"type": "object", "patternProperties": {"^x_": {"type": "integer", "minimum": 0}},
              "required": ["x_a"], "additionalProperties": False}
    rx = compile_schema(json.dumps(schema)).regex
    assert re.fullmatch(rx, '{"x_a":3}') and not re.fullmatch(rx, '{"x_a":-3}')


def test_patterns_are_written_with_json_escaping():
    schema = {"type": "string", "pattern": '^a"b\\\\c.d$'}  # a quote, a backslash, any character
    rx = compile_schema(json.dumps(schema)).regex
    assert re.fullmatch(rx, r'"a\"b\\cxd"')
    assert not re.fullmatch(rx, '"a"b\\cxd"') and not re.fullmatch(rx, r'"a\"b\\c"d"')
    assert re.search(schema["pattern"], json.loads(r'"a\"b\\cxd"'))


@pytest.mark.parametrize("fmt,good,bad", [
    ("date-time", "2024-02-28T13:05:09+01:00", ["2024-02-30T13:05:09Z", "2024-01-01T00:00:00"]),
    ("ipv6", "fe80::1", ["fe80:::1", "1:2:3:4:5:6:7:8:9"]),
    ("uuid", "123e4567-e89b-42d3-a456-426614174000", ["123e4567e89b42d3a456426614174000"]),
    ("uri-reference", "/a/b", ["a b"]),
    ("duration", "P3D", ["P", "3D"]),
    ("json-pointer", "/a/b~0", ["a/b", "/a~2"]),
])
def test_formats(fmt, good, bad):
    rx = compile_schema(json.dumps({"type": "string", "format": fmt})).regex
    assert re.fullmatch(rx, json.dumps(good)), (fmt, good)
    for b in bad:
        assert not re.fullmatch(rx, json.dumps(b)), (fmt, b)


def test_unknown_formats_are_annotations():
    rx = compile_schema(json.dumps({"type": "integer", "format": "int32"})).regex
    assert re.fullmatch(rx, "-12")


# -- refusals and limits -------------------------------------------------------------------------------------------
def test_compile_limits_refuse_naming_the_part_that_blew_up(model):
    def compile_(c, limits):
        return compile_constraint(c, model.tokenizer, model.config.vocab_size, [1, 5], 0, limits)

    big = {"type": "object", "properties": {"small": {"type": "integer"}, "huge": {"type": "array", "items": {
        "type": "object", "properties": {k: {"type": "string", "format": "uri"} for k in "abcdefgh"}}}}}
    with pytest.raises(ConstraintError, match="automaton states .*largest part is at /properties/huge"):
        compile_(Constraint.json_schema(big), CompileLimits(states=300))
    t0 = time.perf_counter()
    with pytest.raises(ConstraintError, match="took more than 0.5 s to compile"):
        compile_(Constraint.regex("a((.{2}a?){1,3}){1,3}"), CompileLimits(seconds=0.5))
    assert time.perf_counter() - t0 < 5  # the child is killed, not waited for
    deep = {"$defs": {"n": {"anyOf": [{"type": "integer"}, {"type": "array", "items": [{"$ref": "#/$defs/n"},
            {"$ref": "#/$defs/n"}, {"$ref": "#/$defs/n"}]}]}}, "$ref": "#/$defs/n"}
    assert compile_schema(json.dumps(deep)).regex  # recursion cut at the bound
    with pytest.raises(ConstraintError, match="more than 10 subschemas"):
        compile_schema(json.dumps(deep), CompileLimits(nodes=10))


def test_compile_limit_flags_reach_the_compile(tmp_path, capsys):
    """--compile-* of `dgemma generate` / `dgemma serve` (and create_app's compile_limits) bound the compile: a tiny
    state limit refuses a schema the defaults compile, naming where and the flag."""
    from fastapi.testclient import TestClient

    from dgemma.cli import build_parser, compile_limits, main
    from dgemma.requests import prepare
    from dgemma.serve import create_app

    path = write_random_checkpoint(tmp_path / "m", "tiny", seed=3)
    wide = {"type": "object", "properties": {"n": {"type": "integer"}, "wide": {"type": "array", "items": {
        "type": "object", "properties": {k: {"type": "string", "format": "uri"} for k in "qrstuvwx"}}}}}
    (tmp_path / "s.json").write_text(json.dumps(wide))
    parse = build_parser().parse_args
    assert compile_limits(parse(["serve", "--compile-states", "300", "--compile-seconds", "7.5"])) == \
        CompileLimits(seconds=7.5, states=300)
    assert compile_limits(parse(["serve", "--compile-memory-mb", "64"])).memory_mb == 64
    assert compile_limits(parse(["serve"])) == CompileLimits()
    common = ["generate", "--model", str(path), "--prompt", "x", "--max-new-tokens", "16", "--max-denoising-steps",
              "2", "--json", "--stats", "--json-schema", f"@{tmp_path / 's.json'}"]
    assert main([*common, "--compile-states", "0"]) == 2
    assert "--compile-states must be a positive number" in capsys.readouterr().err
    assert main([*common, "--compile-states", "300"]) == 2
    err = capsys.readouterr().err
    assert "--json-schema: " in err and "more than 300 automaton states" in err and "at /properties/wide/items" in err
    assert "raise --compile-states" in err
    model = load_model(path)  # the limits travel with a constraint to the generation's compile
    with pytest.raises(ConstraintError, match="more than 300 automaton states"):
        generate(model, [5, 6], max_new_tokens=16,
                 constraint=Constraint.json_schema(wide).with_limits(CompileLimits(states=300)))

    app = create_app(model, compile_limits=CompileLimits(states=300))
    body = {"prompt": "x", "max_tokens": 16, "response_format": {"type": "json_schema", "json_schema": {
        "name": "w", "schema": wide}}}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_constraint" and "at /properties/wide/items" in err["message"]
        ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 16, "seed": 1,
                                                  "structured_outputs": {"regex": "[0-9]{2}"}})
        assert ok.status_code == 200 and re.fullmatch("[0-9]{2}", ok.json()["choices"][0]["text"]), ok.text

    req = prepare(model, [5, 6], constraint=("response_format", Constraint.json_schema(wide)),
                  compile_limits=CompileLimits(states=20_000))  # compiled (last: a compiled constraint is cached)
    assert req.constraint.limits == CompileLimits(states=20_000)
    assert main(common) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] in ("eos", "length")


# -- property test: random schemas with the verifier's keywords ----------------------------------------------------
LEAVES = st.sampled_from([
    {"type": "integer", "minimum": 0, "maximum": 50, "multipleOf": 5},
    {"type": "string", "format": "date"}, {"type": "string", "format": "ipv4"}, {"type": "boolean"},
    {"type": "string", "pattern": "^[a-c]{1,3}$"}, {"enum": ["x", "y", "z"]},
    {"type": "string", "maxLength": 3, "not": {"const": ""}},
    {"type": "array", "items": {"enum": [1, 2, 3, 4]}, "uniqueItems": True, "maxItems": 3},
    {"type": "integer", "minimum": 0, "maximum": 9, "not": {"enum": [3, 4]}},
])


@st.composite
def verified_schemas(draw):
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=2, max_size=4, unique=True))
    props = {n: draw(LEAVES) for n in names}
    schema = {"type": "object", "properties": props, "required": names[:1], "additionalProperties": False}
    extra = draw(st.sampled_from(["min", "max", "dep", "if", "oneOf", "none"]))
    if extra == "min":
        schema["minProperties"] = len(names)
    elif extra == "max":
        schema["maxProperties"] = 2
    elif extra == "dep":
        schema["dependentRequired"] = {names[1]: [names[0]]}
    elif extra == "if":
        schema["properties"]["k"] = {"enum": ["p", "q"]}
        schema["required"] = [*schema["required"], "k"]
        schema["if"] = {"properties": {"k": {"const": "p"}}}
        schema["then"] = {"required": names[:2]}
    elif extra == "oneOf":
        schema["oneOf"] = [{"required": [names[0]]}, {"required": [names[1]]}]
    return schema


@given(schema=verified_schemas(), seed=st.integers(0, 2**31))
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_random_schemas_with_verifier_keywords_always_validate(model, schema, seed):
    _generate_valid(model, schema, seed)


# -- the committed real-world sample -------------------------------------------------------------------------------
def test_real_world_sample_refusals_name_a_keyword_and_path(model):
    """The small schemas of the committed JSONSchemaBench sample (any refusal names keyword and path) and
    generation on a few of them: every output validates with format checking."""
    sample = json.loads(SAMPLE.read_text())
    compiled = generated = 0
    for subset in sample["subsets"].values():
        for name, schema in subset["schemas"].items():
            if len(json.dumps(schema)) > 1500:
                continue
            try:
                c = Constraint.json_schema(schema)
                compile_constraint(c, model.tokenizer, model.config.vocab_size, [1, 5], 0)
            except ConstraintError as e:  # a keyword and its path, or a limit and the path of the largest part
                assert re.search(r"keyword '[^']+' \(at /|part is at /", str(e)), (name, str(e))
                continue
            compiled += 1
            if generated < 6:
                generated += 1
                _generate_valid(model, schema, 0, budget=384)
    assert compiled >= 20
