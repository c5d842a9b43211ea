"""Random container names in Docker's style (adjective_surname), for `netd run` without --name."""

import secrets

ADJECTIVES = (
    "brave calm clever eager fancy gentle happy jolly keen lively mellow nifty proud quick "
    "quiet sharp sleepy smart steady sunny swift tender vivid wise witty zealous bold cool"
).split()
NAMES = (
    "baran cerf clark dijkstra hopper kahn lamport liskov metcalfe postel perlman shannon "
    "thompson torvalds turing wirth knuth ritchie hamilton lovelace mccarthy floyd backus"
).split()


def random_name() -> str:
    return f"{secrets.choice(ADJECTIVES)}_{secrets.choice(NAMES)}"
