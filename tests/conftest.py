pytest_plugins = ["tests.support.fixtures", "tests.support.netns", "tests.support.named_fixtures",
                  "tests.support.slapd_fixtures"]
