"""instructor against a server: ``python instructor_client.py BASE_URL MODE`` prints the extracted
object as JSON. Run by tests/test_tool_clients.py in a virtualenv of its own (instructor.txt).

JSON mode puts the schema in the prompt only, and the 135M demo model does not follow a schema it
is only told about: the question spells the object out there, so that what is checked is instructor's
JSON-mode round trip (``response_format: json_object``, then its parsing), not the model.
"""

import sys
from typing import Literal

import instructor
import openai
from pydantic import BaseModel


class City(BaseModel):
    name: str
    country: str
    continent: Literal["Africa", "America", "Asia", "Europe", "Oceania"]


def main(base_url: str, mode: str) -> None:
    client = instructor.from_openai(openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0),
                                    mode=instructor.Mode[mode])
    question = ('Return the JSON object {"name": "Paris", "country": "France", "continent": "Europe"}.'
                if mode == "JSON" else "Tell me about Paris.")
    city = client.chat.completions.create(model="demo", response_model=City, temperature=0, max_tokens=100,
                                          max_retries=0, messages=[{"role": "user", "content": question}])
    print(city.model_dump_json())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
