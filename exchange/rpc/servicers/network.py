"""NetworkService: public facts a client needs before it can verify anything the hub signs."""

from __future__ import annotations

from google.protobuf import duration_pb2

from exchange.domain.units import MINOR_UNITS
from exchange.hub import VERSION
from exchange.rpc.dispatch import Call
from merchant_sdk._pb.pointsx.v1 import network_pb2


class NetworkServicer:
    async def GetNetworkInfo(self, request: network_pb2.GetNetworkInfoRequest, call: Call) -> network_pb2.NetworkInfo:
        cfg = call.hub.config
        return network_pb2.NetworkInfo(
            hub_name=cfg.network_name,
            hub_keys=[network_pb2.HubKey(key_id=call.hub.hub_key_id, public_key=call.hub.hub_public_key, active=True)],
            currencies=[network_pb2.Currency(code=c, minor_units=MINOR_UNITS[c]) for c in cfg.currencies],
            notice_period=duration_pb2.Duration(seconds=cfg.notice_period_s),
            version=VERSION,
            quote_ttl=duration_pb2.Duration(seconds=cfg.quote_ttl_s),
            reversal_window=duration_pb2.Duration(seconds=cfg.reversal_window_s),
            default_fee_bps=cfg.default_fee_bps,
        )
