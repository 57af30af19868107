"""Model output made safe to print on one line (a random base model emits control bytes)."""


def shorten(text: str, limit: int = 70) -> str:
    text = "".join(ch if ch.isprintable() else "\ufffd" for ch in " ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."
