pytest_plugins = ["tests.support.fixtures", "tests.support.netns", "tests.support.named_fixtures",
                  "tests.support.slapd_fixtures"]


def pytest_addoption(parser):
    parser.addoption("--store-crash-rounds", type=int, default=None, metavar="N",
                     help="rounds per fsync policy of the store crash-consistency test "
                          "(default: a quick CI run; same as STORE_CRASH_ROUNDS=N)")


def pytest_configure(config):
    import os
    rounds = config.getoption("--store-crash-rounds")
    if rounds:
        os.environ["STORE_CRASH_ROUNDS"] = str(rounds)
