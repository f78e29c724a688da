"""Small things tests import by path (a custom reward function)."""


def length_reward(response: str, answer: str) -> float:
    return float(len(response))
