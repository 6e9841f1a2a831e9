"""instructor against a server: ``python instructor_client.py BASE_URL MODE`` prints the extracted
object as JSON; ``... BASE_URL TOOLS partial`` streams it with ``create_partial`` and prints the
distinct partial objects seen, then the last. Run by tests/test_tool_clients.py in a virtualenv of
its own (instructor.txt).

JSON mode puts the schema in the prompt only, and the 135M demo model does not follow a schema it
is only told about: the question spells the object out there, so that what is checked is instructor's
JSON-mode round trip (``response_format: json_object``, then its parsing), not the model.
"""

import json
import sys
from typing import Literal

import instructor
import openai
from pydantic import BaseModel


class City(BaseModel):
    name: str
    country: str
    continent: Literal["Africa", "America", "Asia", "Europe", "Oceania"]


def partials(client: instructor.Instructor) -> None:
    """The partial objects instructor builds as the tool call's arguments stream in."""
    seen = [p.model_dump_json() for p in client.chat.completions.create_partial(
        model="demo", response_model=City, temperature=0, max_tokens=100, max_retries=0,
        messages=[{"role": "user", "content": "Tell me about Paris."}])]
    print(json.dumps({"partials": len(set(seen)), "last": json.loads(seen[-1])}))


def main(base_url: str, mode: str, partial: bool = False) -> None:
    client = instructor.from_openai(openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0),
                                    mode=instructor.Mode[mode])
    if partial:
        return partials(client)
    question = ('Return the JSON object {"name": "Paris", "country": "France", "continent": "Europe"}.'
                if mode == "JSON" else "Tell me about Paris.")
    city = client.chat.completions.create(model="demo", response_model=City, temperature=0, max_tokens=100,
                                          max_retries=0, messages=[{"role": "user", "content": question}])
    print(city.model_dump_json())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] == ["partial"])
