"""Masks as data: rendering with the model's own template, exact span -> token mapping, decoding back."""

from __future__ import annotations

import copy

import pytest

from specdsl.designs.masking import (
    IGNORE_INDEX,
    RenderedSample,
    Span,
    TemplateMaskError,
    render_chat,
    render_prompt_completion,
    tokenize_with_mask,
    trained_runs,
    trained_text,
)

# A Llama-2 style template (system folded into the first user turn, [INST] markup, content stripped,
# BOS/EOS written by the template): nothing in masking may assume ChatML.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# SmolLM2's ChatML template with TRL's {% generation %} markers around what the model must produce:
# the assistant content and the <|im_end|> that ends it (the "\n" after it is the next turn's glue).
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Alice has 12 apples and gives 5 to Bob. How many are left?"},
     {"role": "assistant", "content": "12 - 5 = 7. Answer: 7"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."},
     {"role": "user", "content": "And of Germany?"},
     {"role": "assistant", "content": "Berlin."}],
    # Contents equal to each other and to role names: a naive str.find would land in a header.
    [{"role": "system", "content": "assistant"},
     {"role": "user", "content": "assistant"},
     {"role": "assistant", "content": "assistant"},
     {"role": "user", "content": "user"},
     {"role": "assistant", "content": "user"}],
    [{"role": "user", "content": "Dis bonjour ✓ en français."},
     {"role": "assistant", "content": "Bonjour ! Ça va ? ✓\n\nSecond paragraph,\nwith lines."}],
]


@pytest.fixture(scope="module")
def llama2_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


def assistant_contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_trains_each_assistant_content_and_its_end_token(tiny_tokenizer, messages):
    sample = render_chat(tiny_tokenizer, messages)
    assert sample.text == tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    expected = [content + "<|im_end|>" for content in assistant_contents(messages)]
    assert sample.trained_texts() == expected

    row = tokenize_with_mask(tiny_tokenizer, sample)
    assert trained_text(tiny_tokenizer, row["input_ids"], row["labels"]) == expected
    assert row["num_straddling_tokens"] == 0
    assert row["trained_char_spans"] == [list(run) for run in sample.trained_runs()]
    # The ids are exactly what the model's template tokenization produces (what inference sees).
    assert row["input_ids"] == list(tiny_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert len(row["labels"]) == len(row["input_ids"]) == row["num_tokens"]


def test_spans_land_on_the_right_copy_of_duplicate_contents(tiny_tokenizer):
    messages = CONVERSATIONS[2]
    sample = render_chat(tiny_tokenizer, messages)
    content_spans = [span for span in sample.spans if span.label != "end_of_turn"]
    assert [span.label for span in content_spans] == ["system", "user", "assistant", "user", "assistant"]
    for span, message in zip(content_spans, messages):
        assert sample.text[span.start:span.end] == message["content"]
        header = f"<|im_start|>{message['role']}\n"
        assert sample.text[span.start - len(header):span.start] == header
    assert [span.trained for span in content_spans] == [False, False, True, False, True]


def test_prompt_tokens_never_carry_loss(tiny_tokenizer):
    sample = render_chat(tiny_tokenizer, CONVERSATIONS[1])
    row = tokenize_with_mask(tiny_tokenizer, sample)
    decoded_untrained = tiny_tokenizer.decode(
        [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX])
    for text in ("You are a helpful assistant.", "Capital of France?", "And of Germany?",
                 "<|im_start|>assistant\n"):
        assert text in decoded_untrained
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(row["input_ids"], row["labels"]))


def test_template_default_system_is_not_trained(tiny_tokenizer):
    sample = render_chat(tiny_tokenizer, CONVERSATIONS[0])
    assert "named SmolLM" in sample.text
    assert all("SmolLM" not in text for text in sample.trained_texts())


def test_llama2_template_on_a_copy_of_the_tokenizer(llama2_tokenizer):
    messages = CONVERSATIONS[1]
    sample = render_chat(llama2_tokenizer, messages)
    assert sample.text.startswith("<|im_start|>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n")
    # The system prompt is folded into the first user turn and still located exactly.
    assert sample.texts("system") == ["You are a helpful assistant."]
    assert sample.texts("user") == ["Capital of France?", "And of Germany?"]
    # The end of turn is the template's " </s>" (here the tiny tokenizer's EOS, <|im_end|>).
    assert sample.trained_texts() == ["Paris is the capital of France. <|im_end|>", "Berlin. <|im_end|>"]

    row = tokenize_with_mask(llama2_tokenizer, sample)
    assert row["num_straddling_tokens"] == 0
    decoded = trained_text(llama2_tokenizer, row["input_ids"], row["labels"])
    assert [text.lstrip(" ") for text in decoded] == sample.trained_texts()
    assert [sample.text[s:e] for s, e in row["trained_char_spans"]] == decoded
    assert row["input_ids"] == list(llama2_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def test_template_whitespace_merged_into_the_first_answer_token_is_trained(llama2_tokenizer):
    # Llama 2 writes "[/INST] " + answer; byte-level BPE makes " Answer" one token. The model must emit
    # exactly that token after "[/INST]", so it is trained (the span snaps to the token boundary).
    messages = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer is 7."}]
    sample = render_chat(llama2_tokenizer, messages)
    assert sample.trained_texts() == ["Answer is 7. <|im_end|>"]
    row = tokenize_with_mask(llama2_tokenizer, sample)
    assert row["num_straddling_tokens"] == 0
    assert trained_text(llama2_tokenizer, row["input_ids"], row["labels"]) == [" Answer is 7. <|im_end|>"]
    first = row["labels"].index(next(label for label in row["labels"] if label != IGNORE_INDEX))
    assert llama2_tokenizer.decode([row["input_ids"][first]]) == " Answer"
    assert llama2_tokenizer.decode(row["input_ids"][:first]).endswith("[/INST]")


def test_llama2_template_strips_content_and_parts_are_clipped(llama2_tokenizer):
    messages = [
        {"role": "user", "content": "  What is 7 times 8?  "},
        {"role": "assistant", "content": [
            {"text": "  7 times 8 is 54.", "trained": False, "label": "initial_answer"},
            {"text": "\n\nVerification: wrong. 7 times 8 is 56.\n", "label": "verification"},
        ]},
    ]
    sample = render_chat(llama2_tokenizer, messages)
    assert sample.texts("user") == ["What is 7 times 8?"]
    assert sample.texts("initial_answer") == ["7 times 8 is 54."]
    assert sample.texts("verification") == ["\n\nVerification: wrong. 7 times 8 is 56."]
    row = tokenize_with_mask(llama2_tokenizer, sample)
    assert trained_text(llama2_tokenizer, row["input_ids"], row["labels"]) == [
        "\n\nVerification: wrong. 7 times 8 is 56. <|im_end|>"]


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_parts_select_what_carries_loss(tiny_tokenizer, llama2_tokenizer, template):
    tokenizer = tiny_tokenizer if template == "chatml" else llama2_tokenizer
    messages = [
        {"role": "user", "content": "What is 7 times 8?"},
        {"role": "assistant", "content": [
            {"text": "7 times 8 is 54. Answer: 54", "trained": False, "label": "initial_answer"},
            {"text": "\n\nVerification: the answer is wrong.", "label": "verification"},
            {"text": "\n\n7 times 8 is 56. Answer: 56", "label": "corrected_answer"},
        ]},
    ]
    sample = render_chat(tokenizer, messages)
    end = "<|im_end|>" if template == "chatml" else " <|im_end|>"
    expected = ["\n\nVerification: the answer is wrong.\n\n7 times 8 is 56. Answer: 56" + end]
    assert sample.trained_texts() == expected
    row = tokenize_with_mask(tokenizer, sample)
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == expected
    assert row["target_labels"] == ["verification", "corrected_answer", "end_of_turn"]
    assert row["num_straddling_tokens"] == 0


def test_message_level_trained_override_and_roles(tiny_tokenizer):
    messages = [dict(m) for m in CONVERSATIONS[1]]
    messages[2]["trained"] = False  # only the last answer
    sample = render_chat(tiny_tokenizer, messages)
    assert sample.trained_texts() == ["Berlin.<|im_end|>"]
    everything = render_chat(tiny_tokenizer, CONVERSATIONS[1], trained="all", train_end_of_turn=False)
    assert everything.trained_texts() == [m["content"] for m in CONVERSATIONS[1]]


def test_end_of_turn_can_be_left_out_or_named(tiny_tokenizer):
    messages = CONVERSATIONS[0]
    sample = render_chat(tiny_tokenizer, messages, train_end_of_turn=False)
    assert sample.trained_texts() == ["12 - 5 = 7. Answer: 7"]
    named = render_chat(tiny_tokenizer, messages, end_of_turn="<|im_end|>")
    assert named.trained_texts() == ["12 - 5 = 7. Answer: 7<|im_end|>"]
    with pytest.raises(TemplateMaskError, match="not found"):
        render_chat(tiny_tokenizer, messages, end_of_turn="<|eot_id|>")


def test_a_template_that_writes_content_twice_is_refused(tiny_tokenizer):
    template = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{{ eos_token }}{% endfor %}"
    with pytest.raises(TemplateMaskError, match="2 times"):
        render_chat(tiny_tokenizer, CONVERSATIONS[0], chat_template=template)


def test_a_template_that_drops_a_message(tiny_tokenizer):
    # Some templates ignore system messages. An untrained message that is not written has no span; a
    # trained one that is not written is an error (its loss would silently vanish).
    template = ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    messages = [{"role": "system", "content": "Be brief."}] + CONVERSATIONS[0]
    sample = render_chat(tiny_tokenizer, messages, chat_template=template)
    assert "Be brief." not in sample.text and sample.texts("system") == []
    assert sample.trained_texts() == ["12 - 5 = 7. Answer: 7<|im_end|>"]
    with pytest.raises(TemplateMaskError, match="0 times"):
        render_chat(tiny_tokenizer, messages, chat_template=template, trained="all")


def test_boundary_rule_for_straddling_tokens(tiny_tokenizer):
    # "Restate" is one token; splitting it between an untrained and a trained part makes it straddle.
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": [{"text": "Rest", "trained": False},
                                                  {"text": "ate: 7", "trained": True}]}]
    sample = render_chat(tiny_tokenizer, messages)
    inside = tokenize_with_mask(tiny_tokenizer, sample)
    assert inside["num_straddling_tokens"] == 1
    assert trained_text(tiny_tokenizer, inside["input_ids"], inside["labels"]) == [": 7<|im_end|>"]
    overlap = tokenize_with_mask(tiny_tokenizer, sample, boundary="overlap")
    assert trained_text(tiny_tokenizer, overlap["input_ids"], overlap["labels"]) == ["Restate: 7<|im_end|>"]
    with pytest.raises(ValueError):
        tokenize_with_mask(tiny_tokenizer, sample, boundary="majority")


def test_truncation_is_reported(tiny_tokenizer):
    sample = render_chat(tiny_tokenizer, CONVERSATIONS[1])
    full = tokenize_with_mask(tiny_tokenizer, sample)
    cut = tokenize_with_mask(tiny_tokenizer, sample, max_length=full["num_tokens"] - 3)
    assert not full["truncated"] and cut["truncated"]
    assert cut["num_tokens"] == full["num_tokens"] - 3 == len(cut["input_ids"]) == len(cut["labels"])
    assert cut["num_tokens_untruncated"] == full["num_tokens"]
    assert cut["labels"] == full["labels"][: cut["num_tokens"]]
    assert cut["num_trained_tokens"] < full["num_trained_tokens"]


def test_prompt_completion_plain_strings(tiny_tokenizer):
    sample = render_prompt_completion(tiny_tokenizer, "Question: 2 + 2 =", " 4")
    assert sample.text == "Question: 2 + 2 = 4<|im_end|>"
    assert sample.trained_texts() == [" 4<|im_end|>"]
    row = tokenize_with_mask(tiny_tokenizer, sample)
    assert trained_text(tiny_tokenizer, row["input_ids"], row["labels"]) == [" 4<|im_end|>"]
    # An EOS already present is not doubled; add_eos=False adds none.
    assert render_prompt_completion(tiny_tokenizer, "Q:", " 4<|im_end|>").text == "Q: 4<|im_end|>"
    assert render_prompt_completion(tiny_tokenizer, "Q:", " 4", add_eos=False).trained_texts() == [" 4"]


def test_prompt_completion_conversational(tiny_tokenizer):
    prompt = CONVERSATIONS[1][:4]
    sample = render_prompt_completion(tiny_tokenizer, prompt, "Berlin.")
    assert sample.trained_texts() == ["Berlin.<|im_end|>"]  # earlier assistant turns are prompt


def test_rendered_sample_round_trips_and_validates():
    sample = RenderedSample("abcdef", (Span(0, 2, False, "user"), Span(2, 6, True, "assistant")))
    assert RenderedSample.from_dict(sample.to_dict()) == sample
    with pytest.raises(ValueError):
        RenderedSample("abc", (Span(0, 2, True, "a"), Span(1, 3, True, "b")))
    with pytest.raises(ValueError):
        RenderedSample("abc", (Span(0, 5, True, "a"),))
    with pytest.raises(ValueError):
        Span(3, 2, True, "a")


def test_trained_runs_and_slow_tokenizer_refused():
    assert trained_runs([-100, 5, 6, -100, 7]) == [(1, 3), (4, 5)]
    assert trained_runs([]) == []

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        tokenize_with_mask(SlowTokenizer(), RenderedSample("x", ()))


def test_labels_equal_trl_assistant_only_loss(tiny_tokenizer, tiny_model_dir, tmp_path):
    """Cross-check with TRL 1.16: SFTTrainer(assistant_only_loss=True) on the same conversations, using
    a ChatML template with {% generation %} markers around the assistant content and its <|im_end|>."""
    import warnings

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    trl_tokenizer = copy.deepcopy(tiny_tokenizer)
    trl_tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    # The marker template renders exactly what the served template renders.
    for messages in CONVERSATIONS:
        assert (trl_tokenizer.apply_chat_template(messages, tokenize=False)
                == tiny_tokenizer.apply_chat_template(messages, tokenize=False))

    args = SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, report_to="none",
                     max_length=None, use_cpu=True, bf16=False, fp16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=str(tiny_model_dir), args=args, processing_class=trl_tokenizer,
                             train_dataset=Dataset.from_list([{"messages": m} for m in CONVERSATIONS]))
    examples = [trainer.train_dataset[i] for i in range(len(CONVERSATIONS))]
    batch = trainer.data_collator(examples)

    for index, messages in enumerate(CONVERSATIONS):
        ours = tokenize_with_mask(tiny_tokenizer, render_chat(tiny_tokenizer, messages))
        assert ours["input_ids"] == list(examples[index]["input_ids"])
        assert ours["labels"] == list(examples[index]["labels"])
        # And after TRL's collator (padding on the right, -100 on padding).
        collated = batch["labels"][index].tolist()[: len(ours["labels"])]
        assert collated == ours["labels"]
