"""Sentence splitting for long text and the default audio cap."""

from csm.generation.text import MAX_MS, default_max_audio_ms, frames_for_ms, split_sentences


def test_split_keeps_punctuation_and_quotes():
    text = 'Hello there! How are you?  I am fine. "Really?" Yes.\nNew line here'
    assert split_sentences(text, max_chars=20) == [
        "Hello there!", "How are you?", 'I am fine. "Really?"', "Yes. New line here",
    ]


def test_split_merges_short_sentences_up_to_the_limit():
    assert split_sentences("One. Two. Three.") == ["One. Two. Three."]
    long = "word " * 100 + "end."
    assert split_sentences(long + " Next.", max_chars=50) == [long.strip(), "Next."]
    assert split_sentences("   ") == []


def test_default_cap_grows_with_text_and_is_bounded():
    assert default_max_audio_ms("Hi.") == 3_000 + 150 * 3
    assert default_max_audio_ms("x" * 10_000) == MAX_MS
    assert frames_for_ms(800) == 10 and frames_for_ms(79) == 0
