from lm.datasets import read_text
from seq2seq.data import DataConfig, Pair, group_references, parse_pairs, split_of, split_pairs
from serving.text import normalize


def test_normalize_nfc_no_break_spaces_and_whitespace():
    decomposed = "Cafe\u0301"  # e + combining acute accent
    assert normalize(decomposed) == "Café"
    assert normalize("Cours\u202f!") == "Cours !"
    assert normalize("Salut\u00a0!") == "Salut !"
    assert normalize("  Il  est\tlà. \n") == "Il est là."
    assert normalize("Tom est là.") == "Tom est là."  # case kept by default
    assert normalize("Tom est là.", lowercase=True) == "tom est là."


def test_parse_pairs_skips_bad_lines_drops_attribution_and_duplicates():
    lines = [
        "Go.\tVa !\tCC-BY 2.0 (France) Attribution: tatoeba.org",
        "no tab here",
        "Go.\tVa !",
        "Hi.\t",
        "Run!\tCours\u202f!",
    ]
    assert parse_pairs(lines) == [Pair("Go.", "Va !"), Pair("Run!", "Cours !")]


def test_split_is_a_deterministic_function_of_the_english_sentence():
    sentences = [f"Sentence number {i}." for i in range(4000)]
    first = [split_of(s) for s in sentences]
    assert first == [split_of(s) for s in sentences]
    share = {name: first.count(name) / len(first) for name in ("train", "valid", "test")}
    assert 0.015 < share["valid"] < 0.03 and 0.02 < share["test"] < 0.04


def test_real_data_no_english_sentence_and_no_source_in_two_splits():
    pairs = parse_pairs(read_text("fra-eng").splitlines())
    for src, tgt in (("en", "fr"), ("fr", "en")):
        splits = split_pairs(pairs, DataConfig(src=src, tgt=tgt))
        train_keys = {p.en for p in splits["train"]}
        held_out = {p.en for name in ("valid", "test") for p in splits[name]}
        assert train_keys and held_out and not train_keys & held_out
        assert not {p.side(src) for p in splits["train"]} & {p.side(src) for p in splits["test"]}
        assert not {p.en for p in splits["valid"]} & {p.en for p in splits["test"]}


def test_length_filter_applies_to_both_sides():
    pairs = [Pair("a b c", "x"), Pair("a", "x y z w"), Pair("a b", "x y")]
    splits = split_pairs(pairs, DataConfig(max_words=2, valid_fraction=0.0, test_fraction=0.0))
    assert splits["train"] == [Pair("a b", "x y")]


def test_references_grouped_by_source_in_both_directions():
    pairs = [Pair("Go.", "Va !"), Pair("Hi.", "Salut !"), Pair("Go.", "Marche."), Pair("Hello.", "Salut !")]
    groups = group_references(pairs, "en", "fr")
    assert [(g.source, g.references) for g in groups] == [
        ("Go.", ["Va !", "Marche."]),
        ("Hi.", ["Salut !"]),
        ("Hello.", ["Salut !"]),
    ]
    back = group_references(pairs, "fr", "en")
    assert [(g.source, g.references) for g in back][1] == ("Salut !", ["Hi.", "Hello."])
