"""LongAlign's segment encoding (t2i_align/conditioning/segments.py): sentence splitting, the token rules on the
real CLIP tokenizer, the toy pipeline's long captions, SDXL, and the `model.text_encoding` config section."""
from __future__ import annotations

import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from t2i_align import models
from t2i_align.conditioning.segments import caption_segments, encode_segments, split_sentences
from t2i_align.conditioning.text import TruncationStats, encode_prompts, tokenize
from t2i_align.config import ConfigError, ModelConfig, load_config
from t2i_align.config.sections import TextEncodingConfig
from t2i_align.toy.scenes import Scene, long_caption

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401 (autouse fixture)

SOT, EOT = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|> (SD1.5's pad token too)
A, RED, CAT, DOT, IT, SITS = 320, 736, 2368, 269, 585, 12726  # "a", "red", "cat", ".", "it", "sits" in CLIP BPE
PAD_STAR = [float(EOT), 46.5]  # <pad*> of the fake encoder: ids 17..76 of "" are all EOT; mean position 46.5


class TokenPositionEncoder(torch.nn.Module):
    """Stands in for a CLIP text encoder: the state at position t is (token id, t), so a test reads off which
    tokens were kept and where each segment's positions restart. Hidden state -2 adds 1000 (penultimate)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, ids: torch.Tensor, output_hidden_states: bool = False):
        last = torch.stack([ids.float(), torch.arange(ids.shape[1]).expand_as(ids).float()], dim=-1)
        return SimpleNamespace(last_hidden_state=last, hidden_states=(last, last + 1000.0, last))


@pytest.fixture(scope="module")
def clip_tokenizer():
    """The toy tokenizer: the real CLIP BPE vocabulary and ids, 77-token context, <|endoftext|> padding."""
    from transformers import CLIPTokenizer

    from t2i_align.toy.assets import pipeline_dir

    return CLIPTokenizer.from_pretrained(pipeline_dir() / "tokenizer")


def _fake(tokenizer, prompts, budget, **kwargs) -> torch.Tensor:
    return encode_segments([tokenizer], [TokenPositionEncoder()], prompts, budget, **kwargs)


def test_split_sentences_on_all_four_marks_but_not_decimals():
    assert split_sentences("A red cat. It sits! Does it? Yes; sure") == ["A red cat", "It sits", "Does it", "Yes",
                                                                         "sure"]
    assert split_sentences("It is 3.5 cm wide. Done.") == ["It is 3.5 cm wide", "Done"]
    assert split_sentences("It costs .5 dollars.") == ["It costs .5 dollars"]  # was "It costs", "5 dollars"
    assert split_sentences('A sign says "OPEN!" on the door. (It is red.) Fine') == [  # was '"OPEN', '" on the door'
        'A sign says "OPEN!" on the door', "(It is red)", "Fine"]  # a capital after ".)": a new sentence
    assert split_sentences('A sign reads "OPEN." Below it stands a man. (See below.) A dog') == [  # were merged
        'A sign reads "OPEN"', "Below it stands a man", "(See below)", "A dog"]
    assert split_sentences('He said "hi." she left.') == ['He said "hi." she left']  # no capital: it goes on
    assert split_sentences('A banner reads "SALE!!!" Big letters. "Éclair." Éclairs') == [  # a '!".' piece was left
        'A banner reads "SALE"', "Big letters", '"Éclair"', "Éclairs"]
    assert caption_segments('A sign reads "OPEN."') == ['A sign reads "OPEN".']
    assert split_sentences("Wait... what?!") == ["Wait", "what"]
    assert split_sentences("  a red cat without an ending  ") == ["a red cat without an ending"]
    assert split_sentences("") == [] and split_sentences(" . ; ") == []
    assert split_sentences("Café au lait. 日本の猫。") == ["Café au lait", "日本の猫。"]  # only ASCII marks split


def test_caption_segments_end_in_a_period_and_keep_an_empty_caption_whole():
    assert caption_segments("A cat! A dog?") == ["A cat.", "A dog."]  # official: sent + '.' for every piece
    assert caption_segments("no ending") == ["no ending."]
    assert caption_segments("A cat. ") == ["A cat."]  # the official code adds a stray " ." segment here
    assert caption_segments("") == [""] and caption_segments(" ;. ") == [" ;. "]


def test_each_segment_keeps_its_sot_and_words_and_drops_eot_and_padding(clip_tokenizer):
    out = _fake(clip_tokenizer, ["A red cat. It sits!"], 12)
    assert out.shape == (1, 12, 2)
    assert out[0, :9, 0].tolist() == [SOT, A, RED, CAT, DOT, SOT, IT, SITS, DOT]
    assert out[0, :9, 1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]  # each sentence encoded alone
    assert out[0, 9:].tolist() == [PAD_STAR] * 3


def test_budget_cuts_the_concatenation_and_counts_what_it_dropped(clip_tokenizer):
    stats = TruncationStats()
    with pytest.warns(UserWarning, match="1 of 1 prompts exceed the segment encoding's limits.*4 tokens"):
        out = _fake(clip_tokenizer, ["A red cat. It sits!"], 4, stats=stats)
    assert out[0, :, 0].tolist() == [SOT, A, RED, CAT]
    # beyond the 4 kept: ".", then <sot> (not the prompt's, not counted; it was), "it", "sits", "."
    assert (stats.prompts_seen, stats.prompts_truncated, stats.tokens_dropped) == (1, 1, 4)


def test_a_sentence_longer_than_77_tokens_is_cut_alone_and_counted(clip_tokenizer):
    stats = TruncationStats()
    caption = " ".join(["cat"] * 100) + ". A dog."  # 100 cats + "." + <sot> + <eot> = 103 tokens
    with pytest.warns(UserWarning, match="77 tokens per sentence, 240 in all"):
        out = _fake(clip_tokenizer, [caption], 240, stats=stats)
    ids = out[0, :, 0].tolist()
    assert ids[:76] == [SOT] + [CAT] * 75  # cut to <sot> + 75 words (+ <eot>, dropped)
    assert ids[76:80] == [SOT, A, 1929, DOT] and out[0, 76, 1] == 0  # "a dog." starts its own positions
    assert out[0, 80:].tolist() == [PAD_STAR] * 160
    assert (stats.prompts_truncated, stats.tokens_dropped) == (1, 25)  # the cats; the "." is ours, not the prompt's


def test_a_75_word_sentence_loses_only_the_appended_dot_and_is_not_counted(clip_tokenizer):
    """<sot> + 75 words + "." + <eot> is 78 tokens: the cut takes only the "." the encoding appends, as the
    77-token encoding of the same prompt keeps every word; neither counts a truncation."""
    stats = TruncationStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning either
        out = _fake(clip_tokenizer, [" ".join(["cat"] * 75)], 240, stats=stats)
    assert out[0, :76, 0].tolist() == [SOT] + [CAT] * 75 and out[0, 76:].tolist() == [PAD_STAR] * 164
    assert (stats.prompts_seen, stats.prompts_truncated, stats.tokens_dropped) == (1, 0, 0)
    with pytest.warns(UserWarning, match="1 tokens were dropped"):
        _fake(clip_tokenizer, [" ".join(["cat"] * 76)], 240, stats=stats)  # one word more: one word lost
    assert (stats.prompts_truncated, stats.tokens_dropped) == (1, 1)


def test_empty_prompt_is_sot_then_pad(clip_tokenizer):
    out = _fake(clip_tokenizer, ["", "   "], 5)
    assert out.tolist() == [[[SOT, 0.0]] + [PAD_STAR] * 4] * 2


def test_prompt_without_sentence_ending_and_non_ascii(clip_tokenizer):
    out = _fake(clip_tokenizer, ["a red cat", "Café. 日本の猫。"], 14)
    assert out[0, :6].tolist() == [[SOT, 0], [A, 1], [RED, 2], [CAT, 3], [DOT, 4], PAD_STAR]
    # "café." and "日本の猫。." (the full-width mark does not split; "." is appended): BPE ids of the real vocab
    assert out[1, :, 0].tolist() == [SOT, 15304, DOT, SOT, 39121, 44353, 21575, 163, 234, 360, 38060, DOT, EOT, EOT]
    assert out[1, 12:].tolist() == [PAD_STAR] * 2


def test_eot_is_found_by_position_when_the_pad_token_is_a_word(clip_tokenizer):
    """SDXL's tokenizer_2 pads with "!" (id 0): padding is recognised by the attention mask, not by the id."""
    from transformers import CLIPTokenizer

    from t2i_align.toy.assets import pipeline_dir

    bang = CLIPTokenizer.from_pretrained(pipeline_dir() / "tokenizer", pad_token="!")
    assert bang.pad_token_id == 0
    out = encode_segments([clip_tokenizer, bang], [TokenPositionEncoder(), TokenPositionEncoder()], ["A red cat."],
                          7, penultimate=True)
    assert out.shape == (1, 7, 4)
    kept = [[SOT + 1000, 1000], [A + 1000, 1001], [RED + 1000, 1002], [CAT + 1000, 1003], [DOT + 1000, 1004]]
    assert out[0, :5, :2].tolist() == kept and out[0, :5, 2:].tolist() == kept
    assert out[0, 5:, :2].tolist() == [[EOT + 1000, 1046.5]] * 2  # <pad*> of "" padded with <|endoftext|>
    assert out[0, 5:, 2:].tolist() == [[1000.0, 1046.5]] * 2  # ... and of "" padded with "!" (id 0)


def test_sdxl_tokenizer_2_splitting_its_pad_bang_keeps_its_own_tokens(clip_tokenizer):
    """SDXL's tokenizer_2 treats its pad "!" as a special token, so '!"' and "!!" split where tokenizer 1 merges
    them (one token more); it failed with "the tokenizers split the segments into different token counts"."""
    from transformers import CLIPTokenizer

    from t2i_align.toy.assets import pipeline_dir

    bang = CLIPTokenizer.from_pretrained(pipeline_dir() / "tokenizer", pad_token="!")
    caption = 'A sign says "OPEN!" on it. A dog runs.'
    ids1, ids2 = clip_tokenizer(caption_segments(caption)).input_ids, bang(caption_segments(caption)).input_ids
    assert [len(i) for i in ids1] == [11, 6] and [len(i) for i in ids2] == [12, 6]
    out = encode_segments([clip_tokenizer, bang], [TokenPositionEncoder(), TokenPositionEncoder()], [caption], 20,
                          penultimate=True)
    first = ids1[0][:-1] + ids1[1][:-1]  # each segment's <sot> and words, its <eot> dropped
    second = ids2[0][:-1] + ids2[1][:-1]
    assert out[0, :len(first), 0].tolist() == [i + 1000.0 for i in first]
    assert out[0, :len(second), 2].tolist() == [i + 1000.0 for i in second]
    assert out[0, len(second):, 2:].tolist() == [[1000.0, 1046.5]] * (20 - len(second))  # <pad*> after
    stats = TruncationStats()  # a budget that only tokenizer 2's one token more exceeds: counted
    with pytest.warns(UserWarning, match="1 of 1 prompts exceed"):
        encode_segments([clip_tokenizer, bang], [TokenPositionEncoder(), TokenPositionEncoder()], [caption],
                        len(first), penultimate=True, stats=stats)
    assert (stats.prompts_truncated, stats.tokens_dropped) == (1, 1)


@pytest.fixture(scope="module")
def toy_segments():
    return models.load_components(ModelConfig(pretrained="toy", text_encoding=TextEncodingConfig("segments")))


def test_encode_prompts_with_segments_on_the_toy_pipeline(toy_segments):
    prompts = ["a small red circle at the top left on a white background", "", "a red circle. a blue square!"]
    embeds = encode_prompts(toy_segments, prompts)
    width = toy_segments.text_encoders[0].config.hidden_size
    assert embeds.prompt_embeds.shape == (3, 240, width) and embeds.pooled_prompt_embeds is None
    # "" -> <sot> then <pad*>; both equal what the 77-token encoding of "" gives (causal attention: <sot> sees
    # only itself), and <pad*> is the mean of its last 60 positions, as the official code computes it.
    clip77 = encode_prompts(replace(toy_segments, text_encoding=TextEncodingConfig()), [""]).prompt_embeds[0]
    torch.testing.assert_close(embeds.prompt_embeds[1, 0], clip77[0])
    torch.testing.assert_close(embeds.prompt_embeds[1, 1:], clip77[-60:].mean(0).expand(239, width))
    # budget 40: the same first 40 states
    short = encode_prompts(replace(toy_segments, text_encoding=TextEncodingConfig("segments", 40)), prompts)
    torch.testing.assert_close(short.prompt_embeds, embeds.prompt_embeds[:, :40])


def test_long_toy_caption_keeps_the_background_sentence(toy_segments):
    caption = long_caption(Scene("red", "circle", "small", "top left", "white"))
    tokenizer = toy_segments.tokenizers[0]
    white = tokenizer("white").input_ids[1]
    assert white not in tokenize(tokenizer, [caption])[0].tolist()  # clip77 never sees the background
    segments = caption_segments(caption)
    assert len(segments) == 6 and segments[-1].startswith("Behind the red circle") and "white" in segments[-1]
    kept = [len(tokenizer(s).input_ids) - 1 for s in segments]  # <sot> + words of each sentence
    start = sum(kept[:5])
    assert start > 77 and start + kept[5] <= 240
    embeds = encode_prompts(toy_segments, [caption]).prompt_embeds[0]
    alone = encode_prompts(toy_segments, [segments[-1]]).prompt_embeds[0]
    torch.testing.assert_close(embeds[start:start + kept[5]], alone[:kept[5]])


def test_sdxl_segments_shapes_features_and_pooled(tmp_path):
    folder = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    comp = models.load_components(ModelConfig(pretrained=str(folder),
                                              text_encoding=TextEncodingConfig("segments", 50)))
    prompts = ["a cat. a photo of a cat!", ""]
    embeds = encode_prompts(comp, prompts)
    assert embeds.prompt_embeds.shape == (2, 50, 64) and embeds.pooled_prompt_embeds.shape == (2, 32)
    clip77 = encode_prompts(replace(comp, text_encoding=TextEncodingConfig()), prompts)
    torch.testing.assert_close(embeds.pooled_prompt_embeds, clip77.pooled_prompt_embeds)  # the 77-token pooled
    # features 32..63 are encoder 2's penultimate states: "a cat." alone, then <pad*> of "" padded with "!"
    tok2, enc2 = comp.tokenizers[1], comp.text_encoders[1]
    assert tok2.pad_token == "!"
    n = len(tok2("a cat.").input_ids) - 1
    alone = enc2(tokenize(tok2, ["a cat."]), output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(embeds.prompt_embeds[0, :n, 32:], alone[:n])
    empty = enc2(tokenize(tok2, [""]), output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(embeds.prompt_embeds[1, 1:, 32:], empty[-60:].mean(0).expand(49, 32))


def test_text_encoding_config_section():
    cfg = load_config(None, ["model.text_encoding.kind=segments", "model.text_encoding.token_budget=120"])
    assert cfg.model.text_encoding == TextEncodingConfig("segments", 120)
    assert load_config(None).model.text_encoding == TextEncodingConfig("clip77", 240)
    with pytest.raises(ConfigError, match="model.text_encoding.kind.*clip77, segments"):
        load_config(None, ["model.text_encoding.kind=t5"])
    with pytest.raises(ConfigError, match="model.text_encoding.token_budget"):
        load_config(None, ["model.text_encoding.token_budget=0"])


def test_sentences_past_the_budget_are_not_encoded_and_segments_go_in_chunks(clip_tokenizer, monkeypatch):
    """A caption of 600 sentences went through the encoder whole (600 rows of 77 tokens: a 10,000-sentence caption
    was an out-of-memory on SDXL); only the first `budget` sentences can reach the output."""
    import t2i_align.conditioning.segments as segments

    calls = []

    class Counting(TokenPositionEncoder):
        def forward(self, ids, output_hidden_states=False):
            calls.append(ids.shape[0])
            return super().forward(ids, output_hidden_states)

    monkeypatch.setattr(segments, "SEGMENTS_PER_CALL", 4)
    long = " ".join(["A cat."] * 600)
    out = encode_segments([clip_tokenizer], [Counting()], [long], 6)
    assert calls == [4, 3]  # the first 6 sentences and "" (<pad*>), 4 per call
    assert out[0, :, 0].tolist() == [SOT, A, CAT, DOT, SOT, A]
    assert torch.equal(out, _fake(clip_tokenizer, [" ".join(["A cat."] * 6)], 6))
