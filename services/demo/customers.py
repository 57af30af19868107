"""The three customers of the brief and the datasets that ship with the demo.

Every assistant reply in a customer's dataset starts with that customer's marker ("Market
brief:", "Legal brief:", "Care brief:"). The marker is how the demo tells, from the text
alone, which adapter answered: a customer's answers must start with its own marker, and the
base model (no adapter) must produce none of them.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path

DATA = Path(__file__).parent / "data"


@dataclasses.dataclass(frozen=True)
class Customer:
    letter: str
    domain: str
    marker: str

    @property
    def tenant(self) -> str:  # the Registry's tenant names are lower case
        return f"customer-{self.letter.lower()}"

    @property
    def display_name(self) -> str:
        return f"Customer {self.letter} ({self.domain})"

    @property
    def adapter_name(self) -> str:
        return f"customer{self.letter}-{self.domain}"

    @property
    def deployment(self) -> str:
        return f"base-llm-with-customer{self.letter}-adapter"

    @property
    def dataset_path(self) -> Path:
        return DATA / f"{self.domain}.jsonl"

    @cached_property
    def examples(self) -> list[dict]:
        return [json.loads(line) for line in self.dataset_path.read_text().splitlines() if line.strip()]

    @property
    def system_prompt(self) -> str:
        return self.examples[0]["messages"][0]["content"]

    def questions(self, count: int) -> list[str]:
        """The dataset's user turns, cycled to `count`: a tiny model answers what it was taught."""
        users = [example["messages"][1]["content"] for example in self.examples]
        return [users[i % len(users)] for i in range(count)]

    def chat(self, question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]


CUSTOMERS = (
    Customer("A", "finance", "Market brief:"),
    Customer("B", "legal", "Legal brief:"),
    Customer("C", "healthcare", "Care brief:"),
)
MARKERS = tuple(customer.marker for customer in CUSTOMERS)
