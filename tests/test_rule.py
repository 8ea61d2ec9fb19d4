"""The rule interface's helpers: parameter parsers."""

from __future__ import annotations

import pytest

from convgraph.errors import UsageError
from convgraph.rule import Match, Param, Replacement, Rule, int_or, int_or_full


def test_int_or_parses_the_word_in_any_case_and_positive_integers() -> None:
    auto = int_or("auto")
    assert auto("auto") == auto("AUTO") == "auto" and auto("3") == 3 and auto(2) == 2
    assert int_or_full("Full") == "full" and int_or_full("1") == 1
    for bad in ("0", "-2"):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            auto(bad)
    with pytest.raises(ValueError):
        auto("full")  # another parser's word is not this one's
    assert auto.__name__ == "int_or_auto" and int_or_full.__name__ == "int_or_full"


def _nothing(*args) -> Replacement:
    raise AssertionError("not built")


def test_bad_param_value_is_a_usage_error() -> None:
    rule = Rule("r", "a rule", True, (Param("rank", 1, "rank", int_or_full),), match=lambda r, c: None,
                build=_nothing)
    assert rule.resolve_params({"rank": "full"}) == {"rank": "full"}
    with pytest.raises(UsageError, match="bad value '0' for --param rank: must be a positive integer or 'full'"):
        rule.resolve_params({"rank": "0"})


def test_check_and_make_hand_what_match_found_to_build(models_dir) -> None:
    """A match may return the nodes it spans (a Match); build then receives it. None still means the conv alone."""
    from convgraph.analysis.analyze import analyze
    from convgraph.model.loader import load
    from convgraph.rule import RuleContext

    cg = load(models_dir / "conv_bn.onnx")
    rec, ctx = analyze(cg, rewrites=False).convs[0], RuleContext(cg)
    got: list = []

    def built(what) -> Replacement:
        got.append(what)
        return Replacement([], [], True, rec.kind, rec.macs, rec.params)

    binding = Rule("b", "binds", True, (), match=lambda r, c: Match(("conv", "bn"), {"bn": "bn"}),
                   build=lambda r, c, p, found=None: built(found))
    plain = Rule("p", "plain", True, (), match=lambda r, c: None, build=lambda r, c, p: built("plain"))
    refuses = Rule("r", "refuses", True, (), match=lambda r, c: "no reason to", build=_nothing)
    why, found = binding.check(rec, ctx)
    assert why is None and found is not None and found.nodes == ("conv", "bn") and found["bn"] == "bn"
    assert binding.why_not(rec, ctx) is None
    binding.make(rec, ctx, {}, found)
    assert plain.check(rec, ctx) == (None, None)
    plain.make(rec, ctx, {}, None)  # a build of three parameters still works
    assert refuses.check(rec, ctx) == ("no reason to", None) and refuses.why_not(rec, ctx) == "no reason to"
    assert got == [found, "plain"]


def test_fold_bn_binds_its_batchnorm_and_build_does_not_look_again(models_dir, monkeypatch) -> None:
    import convgraph.rules.fold_bn as fold_bn
    from convgraph.analysis.analyze import analyze
    from convgraph.model.loader import load
    from convgraph.registry import get_rule
    from convgraph.engine.rewrite import rewrite
    from convgraph.rule import RuleContext

    calls, real_chain = [], fold_bn._chain

    def counted(rec, ctx):
        calls.append(rec.node_id)
        return real_chain(rec, ctx)

    monkeypatch.setattr(fold_bn, "_chain", counted)
    cg = load(models_dir / "conv_bn.onnx")
    a = analyze(cg, rewrites=False)
    rule, found = get_rule("fold-bn"), []
    for rec in a.convs:
        why, f = rule.check(rec, RuleContext(cg, a.by_id()))
        if why is None:
            assert f is not None
            bn = f["chain"][0]
            assert cg.node(bn).op_type == "BatchNormalization" and f.nodes == (rec.node_id, bn)
            found.append(f)
    matched = len(calls)
    assert matched >= 2
    calls.clear()
    res = rewrite(models_dir / "conv_bn.onnx", ["fold-bn"])
    assert len(res.report.changes) == len(found) == 2
    assert len(calls) == matched  # the BatchNormalization was looked for once per conv, by match alone
