"""Records with `segments` → the per-token `source` array: alignment, limits, refusals."""

import json

import numpy as np
import pytest

from megatron_dcod.config import PreprocessConfig, RecordFields
from megatron_dcod.data.inspect import dataset_summary, format_trace
from megatron_dcod.data.preprocess import preprocess_traces
from megatron_dcod.data.sources import SOURCE_CODES
from megatron_dcod.data.trace_format import TraceDataset

from ..conftest import PROBLEMS, write_jsonl

PROMPT = "Compute 12 + 7."
# boundaries inside the tokens "wit" and " 12", and between tokens around "However,\n\n"
SEGMENTS = [
    ("student", "Start wi"),
    ("teacher", "th 12.\n\n"),
    ("inserted", "However,\n\n"),
    ("teacher", ""),  # empty: owns no character
    ("teacher", "Add 7: 1"),
    ("student", "2 + 7 = 19."),
]


def record_of(segments, prompt=PROMPT, **extra) -> dict:
    response = "".join(text for _, text in segments)
    pieces = [{"source": source, "text": text} for source, text in segments]
    return {"prompt": prompt, "response": response, "segments": pieces, **extra}


def build(tmp_path, records, tokenizer_dir, name="ds", **overrides):
    source = write_jsonl(tmp_path / f"{name}.jsonl", records)
    config = PreprocessConfig(
        inputs=(str(source),),
        output_prefix=str(tmp_path / "out" / name),
        tokenizer=str(tokenizer_dir),
        **overrides,
    )
    return preprocess_traces(config), TraceDataset(config.output_prefix)


def expected_sources(chat_tokenizer, prompt, segments) -> list[int]:
    """Each token's source from the tokenizer's offsets, by a loop over the characters of the
    rendered text: who wrote the token's first character; template text of the response turn
    goes to the nearest segment; 0 off the loss mask."""
    response = "".join(text for _, text in segments)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    text = chat_tokenizer.render(messages)
    start = text.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    assert text.startswith(response, start)
    owner = {}  # character index in the text → source code
    at = start
    for source, piece in segments:
        for _ in piece:
            owner[at] = SOURCE_CODES[source]
            at += 1
    written = [SOURCE_CODES[source] for source, piece in segments if piece]
    encoded = chat_tokenizer.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ((tokens, mask),) = chat_tokenizer.encode([messages])
    assert tokens.tolist() == encoded["input_ids"]
    sources = []
    for (first, _), supervised in zip(encoded["offset_mapping"], mask):
        if not supervised:
            sources.append(0)
        elif first in owner:
            sources.append(owner[first])
        else:
            sources.append(written[0] if first < start else written[-1])
    return sources


def test_sources_follow_the_first_character_of_each_token(tmp_path, tokenizer_dir, chat_tokenizer):
    meta, dataset = build(tmp_path, [record_of(SEGMENTS)], tokenizer_dir)
    trace = dataset[0]
    assert "source" in dataset.meta["arrays"]
    expected = expected_sources(chat_tokenizer, PROMPT, SEGMENTS)
    assert trace.source.tolist() == expected
    # by hand: the tiny tokenizer splits the response as
    # St ar t ␣ wit | h ␣12 . \n \n | H o w e v er , \n \n | Ad d ␣7 : ␣12 | ␣+ ␣7 ␣= ␣1 9 . <|im_end|>
    s, t, i = 1, 2, 3
    response = [s] * 5 + [t] * 5 + [i] * 9 + [t] * 5 + [s] * 6 + [s]  # the end-of-turn: the last
    first = int(np.argmax(trace.loss_mask))
    pieces = chat_tokenizer.tokenizer.convert_ids_to_tokens(trace.tokens[first:].tolist())
    assert pieces[4] == "wit" and pieces[6] == "Ġ12" and pieces[-2] == "<|im_end|>"
    assert trace.source[first:].tolist() == response + [0]  # the trailing "\n" is no target
    assert not trace.source[:first].any()
    assert meta["counts"]["supervised_tokens_by_source"] == {
        "student": 12,
        "teacher": 10,
        "inserted": 9,
    }
    sidecar = json.loads(open(f"{dataset.prefix}.sidecar.jsonl").readline())
    assert "segments" not in sidecar
    assert (
        dataset_summary(dataset)["supervised_by_source"]
        == meta["counts"]["supervised_tokens_by_source"]
    )
    assert format_trace(dataset, 0).splitlines()[2 + first + 10].split()[-1] == "inserted"


def random_segments(rng, response: str) -> list[tuple[str, str]]:
    cuts = sorted(rng.choice(np.arange(1, len(response)), min(4, len(response) - 1), False))
    edges = [0, *cuts, len(response)]
    names = list(SOURCE_CODES)[1:]
    return [(names[rng.integers(3)], response[a:b]) for a, b in zip(edges, edges[1:])]


def test_random_boundaries_match_the_offsets(tmp_path, tokenizer_dir, chat_tokenizer):
    rng = np.random.default_rng(0)
    cases = [(prompt, random_segments(rng, response)) for prompt, response in PROBLEMS * 3]
    records = [record_of(segments, prompt) for prompt, segments in cases]
    _, dataset = build(tmp_path, records, tokenizer_dir)
    for index, (prompt, segments) in enumerate(cases):
        expected = expected_sources(chat_tokenizer, prompt, segments)
        assert dataset[index].source.tolist() == expected, index
    _, with_workers = build(tmp_path, records, tokenizer_dir, name="workers", workers=2)
    out = tmp_path / "out"
    assert (out / "workers_source.bin").read_bytes() == (out / "ds_source.bin").read_bytes()


def test_truncation_keeps_the_head_of_the_sources(tmp_path, tokenizer_dir):
    _, full = build(tmp_path, [record_of(SEGMENTS)], tokenizer_dir, name="full")
    limit = int(np.argmax(full[0].loss_mask)) + 12
    meta, cut = build(
        tmp_path, [record_of(SEGMENTS)], tokenizer_dir, name="cut", max_seq_length=limit
    )
    assert meta["records"]["truncated"] == 1
    assert cut[0].source.tolist() == full[0].source[:limit].tolist()
    by_source = np.bincount(cut[0].source[cut[0].loss_mask == 1], minlength=4)[1:].tolist()
    assert list(meta["counts"]["supervised_tokens_by_source"].values()) == by_source


def test_messages_records_and_a_renamed_field(tmp_path, tokenizer_dir):
    plain = record_of(SEGMENTS)
    messages = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": plain["response"]},
        ],
        "pieces": plain["segments"],
    }
    _, dataset = build(tmp_path, [messages], tokenizer_dir, fields=RecordFields(segments="pieces"))
    _, reference = build(tmp_path, [plain], tokenizer_dir, name="plain")
    trace, expected = dataset[0], reference[0]
    assert (
        trace.source[trace.loss_mask == 1].tolist()
        == expected.source[expected.loss_mask == 1].tolist()
    )


@pytest.mark.parametrize(
    "segments, message",
    [
        (
            [{"source": "student", "text": "Start with 12."}],
            "the texts of 'segments' do not concatenate to the response",
        ),
        (
            [{"source": "student", "text": "Start "}, {"source": "oracle", "text": "with 13."}],
            r"'segments'\[1\] has source 'oracle': must be one of student, teacher, inserted",
        ),
        ([{"source": "teacher"}], r"'segments'\[0\] must be an object with a string 'text'"),
        ([], "field 'segments' must be a non-empty list"),
    ],
)
def test_bad_segments_name_the_record(tmp_path, tokenizer_dir, segments, message):
    good = record_of([("teacher", "Start with 13.")])
    bad = {"prompt": PROMPT, "response": "Start with 13.", "segments": segments}
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {message}"):
        build(tmp_path, [good, bad], tokenizer_dir, name="bad")
    assert not list((tmp_path / "out").glob("bad*"))
    meta, dataset = build(tmp_path, [good, bad], tokenizer_dir, name="bad", skip_bad=True)
    assert meta["records"]["skipped_invalid"] == 1 and len(dataset) == 1


def test_the_difference_is_shown(tmp_path, tokenizer_dir):
    record = record_of([("student", "Start with 12.")])
    record["response"] = "Start with 13."
    with pytest.raises(ValueError, match=r"from character 12: '2\.' vs '3\.'"):
        build(tmp_path, [record], tokenizer_dir)


def test_records_with_and_without_segments_do_not_mix(tmp_path, tokenizer_dir):
    plain = {"prompt": PROMPT, "response": "Start with 12."}
    with pytest.raises(ValueError, match="ds.jsonl:2: has no 'segments' field, unlike the rec"):
        build(tmp_path, [record_of(SEGMENTS), plain], tokenizer_dir)
    with pytest.raises(ValueError, match="ds.jsonl:3: has 'segments' field, unlike the records"):
        build(tmp_path, [plain, plain, record_of(SEGMENTS)], tokenizer_dir)


def test_segments_need_a_single_assistant_turn(tmp_path, tokenizer_dir):
    record = {
        "messages": [
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": "19"},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "19"},
        ],
        "segments": [{"source": "teacher", "text": "19"}],
    }
    with pytest.raises(ValueError, match="ds.jsonl:1: 'segments' describe one response, but"):
        build(tmp_path, [record], tokenizer_dir)
