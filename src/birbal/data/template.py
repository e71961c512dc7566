"""The winners' prompt template (their `combine_datasets.py`), applied before training.

Training then appends the answer to the templated question with no further wrapping (their axolotl copy's
`alpaca_chat.load_qa` turns the chat template into plain `{instruction}`), so the model sees exactly this text.
"""

INSTRUCTION_PREFIX = "### Instruction:\n"
INPUT_PREFIX = "### Input:\n"
RESPONSE_PREFIX = "### Response:\n"


def format_question(instruction: str, input_text: str) -> str:
    """`### Instruction:` block (left out when the instruction is blank), `### Input:` block, response header."""
    question = ""
    if instruction.strip():
        question += f"{INSTRUCTION_PREFIX}{instruction}\n\n"
    question += f"{INPUT_PREFIX}{input_text}\n\n"
    question += RESPONSE_PREFIX
    return question
