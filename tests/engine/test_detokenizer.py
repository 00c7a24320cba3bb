from __future__ import annotations

import pytest

from serving.engine.detokenizer import IncrementalDetokenizer

MULTIBYTE = "Héllo 😀 wörld: 中文字 and 🇫🇷 flags, 日本語テキスト 🎉!"


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = []
    for token in ids:
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas


def test_multibyte_round_trip_without_partials(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE.split())  # some characters span several tokens
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == tokenizer.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in d for d in deltas)


def test_prompt_context_and_special_tokens(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)["input_ids"]
    reply = [*tokenizer.encode(" Hi there 😀"), tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    text = "".join(stream(detok, reply))
    assert text == tokenizer.decode(reply, skip_special_tokens=True) == " Hi there 😀"
    assert detok.text == text


def test_stop_string_split_across_tokens(tokenizer):
    text = "Hello world, the end is near. STOP here and more"
    ids = tokenizer.encode(text)
    assert "STOP" not in [tokenizer.decode([i]) for i in ids]  # " ST" + "OP": the match spans tokens
    detok = IncrementalDetokenizer(tokenizer, stop=("STOP",))
    deltas = []
    for token in ids:
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    assert detok.stopped and detok.stop_string == "STOP"
    assert "".join(deltas) == "Hello world, the end is near. "
    assert len(deltas) < len(ids)  # stopped as soon as the match completed
    assert detok.add(ids[-1]) == "" and detok.flush() == ""  # nothing after the stop


def test_possible_stop_prefix_is_held_back_then_released(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=("near-miss",))
    ids = tokenizer.encode("we are near")
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == "we are "  # "near" could start the stop string
    assert detok.add(tokenizer.encode(" here")) == "near here"
    assert not detok.stopped
    detok2 = IncrementalDetokenizer(tokenizer, stop=("near-miss",))
    for t in ids:
        detok2.add(t)
    assert detok2.flush() == "near"  # the generation ended: held text is released


def test_earliest_of_several_stops_wins(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=("end", "the end", ""))
    out = "".join(stream(detok, tokenizer.encode("Hello world, the end is near.")))
    assert out == "Hello world, "
    assert detok.stop_string == "the end"


@pytest.mark.parametrize("stop", ["Hello", "H"])
def test_stop_at_the_very_start(tokenizer, stop):
    detok = IncrementalDetokenizer(tokenizer, stop=(stop,))
    assert "".join(stream(detok, tokenizer.encode("Hello world"))) == ""
    assert detok.stopped
