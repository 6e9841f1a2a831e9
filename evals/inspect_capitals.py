"""An inspect-ai eval from evals/capitals.jsonl: the model is asked each country's capital and must name it.

Run against a server: ``inspect eval evals/inspect_capitals.py --model openai-api/mlxnb/demo`` with
``MLXNB_BASE_URL=http://127.0.0.1:8000/v1`` and ``MLXNB_API_KEY`` set (any value if the server has no key).
"""

from pathlib import Path

from inspect_ai import Task, task
from inspect_ai.dataset import Sample, json_dataset
from inspect_ai.scorer import includes
from inspect_ai.solver import generate, system_message


def record_to_sample(record: dict) -> Sample:
    return Sample(input=f"What is the capital of {record['country']}?", target=record["capital"],
                  id=record["country"])


@task
def capitals() -> Task:
    return Task(
        dataset=json_dataset(str(Path(__file__).parent / "capitals.jsonl"), record_to_sample),
        solver=[system_message("Answer with the name of the city only."), generate()],
        scorer=includes(),
    )
