# twistd plugins for CPUShare.  Discovering them imports nothing of cpushare
# and no reactor: each ServiceMaker names the module that holds Options and
# makeService, which twistd imports only when that plugin is asked for.

from twisted.application.service import ServiceMaker

cpushareServer = ServiceMaker(
    "CPUShare market server",
    "cpushare.server.tap",
    "The CPUShare market: accounts, certificates, the channel relay",
    "cpushare-server",
)

cpushareSeller = ServiceMaker(
    "CPUShare seller",
    "cpushare.client.seller.service",
    "Rent this computer's idle CPU time on the CPUShare market",
    "cpushare-seller",
)

cpushareBuyer = ServiceMaker(
    "CPUShare buyer",
    "cpushare.client.buyer.service",
    "Run VMs on the CPUShare market and join them to a virtual ethernet",
    "cpushare-buyer",
)
