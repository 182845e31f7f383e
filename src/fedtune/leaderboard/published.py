"""The published FlowerTune General NLP board: the first rows of every fedtune leaderboard.

Copied from the challenge's public page (https://flower.ai/benchmarks/llm-leaderboard/nlp/). A row's
`code_url` is its team's public repository where known (`CODE_URLS`), else that page. Communication is given there
as "GB" with one decimal (GiB, see `fedtune.units.BYTES_PER_GB`); it is stored as that many GiB in bytes,
so it prints back exactly as published. A new run is thus ranked in context.
"""

from __future__ import annotations

import datetime as dt

from fedtune.leaderboard.entry import GENERAL_NLP, PUBLISHED, Entry
from fedtune.units import BYTES_PER_GB

BOARD_URL = "https://flower.ai/benchmarks/llm-leaderboard/nlp/"

# rank, team, base model, comm. GB, Average, STEM, Social Sciences, Humanities, date (dd.mm.yy)
# fmt: off
PUBLISHED_ROWS: tuple[tuple[int, str, str, float, float, float, float, float, str], ...] = (
    (1, "ZeroOne.AI", "Internlm3-8b-instruct", 2.9, 69.25, 66.13, 80.76, 60.87, "14.01.26"),
    (2, "Gachon Cognitive Computing Lab", "Internlm3-8b-instruct", 2.9, 69.19, 66.22, 80.56, 60.80, "19.03.25"),  # noqa: E501
    (3, "T-IoI@UNR", "Gemma2-9b-cpt-sahabatai-v1-instruct", 0.7, 67.78, 59.75, 81.11, 62.48, "09.03.25"),  # noqa: E501
    (4, "FL-finetune-JB-DC", "Qwen2.5-7B-Instruct", 1.5, 67.71, 63.11, 79.29, 60.74, "12.04.25"),
    (5, "FL-finetune-JB-DC", "Qwen2.5-7B-Instruct", 1.5, 67.18, 62.67, 78.94, 59.93, "12.04.25"),
    (6, "Gachon Cognitive Computing Lab", "Gemma2-9B-instruct", 0.7, 64.84, 54.33, 79.92, 60.28, "10.12.24"),  # noqa: E501
    (7, "ZJUDAI", "Qwen2.5-7B-Instruct", 1.5, 64.04, 52.52, 79.27, 60.32, "04.04.25"),
    (8, "Massimo R. Scamarcia", "Phi-4", 44.7, 55.64, 40.66, 74.52, 51.75, "12.01.25"),
    (9, "ZJUDAI", "Qwen2.5-1.5B-Instruct", 0.7, 53.32, 47.13, 62.30, 50.54, "04.04.25"),
    (10, "Alessandro Pinto", "Qwen2.5-1.5B-Instruct", 2.1, 52.77, 44.49, 63.89, 49.92, "14.03.25"),
    (11, "ZJUDAI", "Mistral-7B-Instruct-v0.3", 2.0, 43.05, 29.94, 54.27, 44.93, "04.04.25"),
    (12, "ZJUDAI", "Llama-3.1-8B-Instruct", 2.0, 31.49, 22.87, 39.55, 32.05, "04.04.25"),
    (13, "Baseline", "Llama-3.2-3B", 27.4, 21.68, 22.20, 25.32, 17.53, "09.12.24"),
    (14, "T-IoI@UNR", "SmolLM2-135M-Instruct", 0.7, 21.10, 18.68, 21.90, 22.74, "14.04.25"),
    (15, "ZJUDAI", "TinyLlama-1.1B-Chat-v1.0", 0.7, 19.23, 14.18, 21.61, 21.91, "04.04.25"),
    (16, "T-IoI@UNR", "SmolLM2-360M-Instruct", 1.3, 17.18, 19.44, 19.43, 12.68, "14.04.25"),
    (17, "Baseline", "Mistral-7B-v0.3", 40.7, 12.82, 12.37, 13.49, 12.60, "01.10.24"),
    (18, "ZJUDAI", "Llama-3.2-1B-Instruct", 0.5, 12.22, 12.88, 17.61, 6.16, "04.04.25"),
    (19, "T-IoI@UNR", "SmolLM2-135M", 0.7, 2.84, 2.94, 3.31, 2.29, "14.04.25"),
)
# fmt: on

# The teams' public code, where it is known (by published rank); other rows link to the board.
FLOWER_BASELINE = "https://github.com/adap/flower/tree/main/examples/flowertune-llm"
_GITHUB = "https://github.com/"
CODE_URLS: dict[int, str] = {
    1: _GITHUB + "0-1-ai/01AI-FlowerTune-LLM-Leaderboard-General-NLP",
    2: _GITHUB + "gachon-CCLab/GCCL-General-NLP2-FlowerTune",
    3: _GITHUB + "TNI-playground/TNI-FlowerTune-LLM-Leaderboard-GeneralNLP",
    4: _GITHUB + "jiamubai/general-nlp-flowerfinetune",
    5: _GITHUB + "jiamubai/general-nlp-flowerfinetune",
    6: _GITHUB + "gachon-CCLab/GCCL-General-NLP-FlowerTune",
    7: _GITHUB + "zjudai/flowertune-llm",
    9: _GITHUB + "zjudai/flowertune-llm",
    10: _GITHUB + "Snap997/FlowerTune",
    11: _GITHUB + "zjudai/flowertune-llm",
    12: _GITHUB + "zjudai/flowertune-llm",
    13: FLOWER_BASELINE,
    14: _GITHUB + "TNI-playground/TNI-FlowerTune-LLM-Leaderboard-GeneralNLP-SmolLM2-Series",
    15: _GITHUB + "zjudai/flowertune-llm",
    16: _GITHUB + "TNI-playground/TNI-FlowerTune-LLM-Leaderboard-GeneralNLP-SmolLM2-Series",
    17: FLOWER_BASELINE,
    18: _GITHUB + "zjudai/flowertune-llm",
    19: _GITHUB + "TNI-playground/TNI-FlowerTune-LLM-Leaderboard-GeneralNLP-SmolLM2-Series",
}


def published_entries() -> list[Entry]:
    """The published rows as entries (status "published", General NLP track, no id yet)."""
    entries = []
    for rank, team, model, gb, average, stem, social, humanities, day in PUBLISHED_ROWS:
        entries.append(
            Entry(
                team=team,
                code_url=CODE_URLS.get(rank, BOARD_URL),
                base_model=model,
                track=GENERAL_NLP,
                comm_bytes=round(gb * BYTES_PER_GB),
                average=average,
                stem=stem,
                social_sciences=social,
                humanities=humanities,
                date=dt.datetime.strptime(day, "%d.%m.%y").date().isoformat(),
                status=PUBLISHED,
                details={
                    "published_rank": rank,
                    "evaluation": {"protocol": "flowertune", "protocol_version": "published"},
                    "source": BOARD_URL,
                },
            )
        )
    return entries
