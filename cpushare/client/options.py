"""Options shared by the seller and buyer programs."""

from twisted.python import usage

from cpushare.client.home import Home, HomeError, defaultHome


class ClientOptions(usage.Options):
    optParameters = [
        ["home", "H", None, "The account's home folder (default $CPUSHARE_HOME or ~/.cpushare)."],
    ]

    def postOptions(self):
        self.home = Home(self["home"] or defaultHome())
        if not self.home.exists():
            raise usage.UsageError(
                f"{self.home.path} holds no account: run "
                f"'cpushare --home {self.home.path} register' first"
            )
        try:
            self.home.credentials()
            self.host, self.port = self.home.server
        except HomeError as e:
            raise usage.UsageError(str(e))
