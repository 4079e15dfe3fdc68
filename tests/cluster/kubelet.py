"""What the kubelet does to container args and env values before the process starts: ``$(VAR)`` expansion.

Same rules as Kubernetes' third_party/forked/golang/expansion: ``$$`` → ``$``; ``$(NAME)`` → the value of an
env var defined for the container (left as written when undefined); any other ``$`` stays.
"""

from __future__ import annotations


def expand(text: str, env: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env.get(name, text[i : end + 1]))
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def container_env(container: dict, secrets: dict[str, str]) -> dict[str, str]:
    """Env of a rendered container as the process sees it; secretKeyRef values come from ``secrets``."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "secretKeyRef" in (item.get("valueFrom") or {}):
            env[item["name"]] = secrets.get(item["name"], "")
    return env
