"""A read-everything MQTT client on every regional listener: shows which broker each message reached."""
import json
import queue
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from devstack.stack import MONITOR_IDENTITY, StackFiles


@dataclass(frozen=True)
class Received:
    region: str
    topic: str
    payload: dict | str


class Monitor:
    def __init__(self, files: StackFiles, host: str = "localhost"):
        self.messages: "queue.Queue[Received]" = queue.Queue()
        self._clients: list[mqtt.Client] = []
        self._files = files
        self._host = host

    def start(self, timeout: float = 10) -> "Monitor":
        subscribed = []
        for listener in self._files.listeners():
            client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                 client_id=f"{MONITOR_IDENTITY}-{listener.region}", protocol=mqtt.MQTTv5)
            client.tls_set(ca_certs=str(listener.ca_file), certfile=str(listener.monitor_cert),
                           keyfile=str(self._files.monitor_key))
            ready = threading.Event()
            client.on_connect = lambda c, u, f, rc, p: c.subscribe("data/#", qos=1)
            client.on_subscribe = lambda c, u, mid, rcs, p, ready=ready: ready.set()
            client.on_message = self._handler(listener.region)
            try:
                client.connect(self._host, listener.port)
            except OSError:
                self.stop()  # the listeners already joined must not keep their threads running
                raise
            client.loop_start()
            self._clients.append(client)
            subscribed.append(ready)
        deadline = time.monotonic() + timeout
        for ready in subscribed:
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise TimeoutError("the monitor could not subscribe on every regional listener")
        return self

    def _handler(self, region: str):
        def on_message(client, userdata, message):
            try:
                payload = json.loads(message.payload)
            except ValueError:
                payload = message.payload.decode(errors="replace")
            self.messages.put(Received(region, message.topic, payload))
        return on_message

    def drain(self, wait: float = 0.0) -> list[Received]:
        """Everything received so far, waiting up to `wait` seconds for the first message if none yet."""
        got = []
        try:
            got.append(self.messages.get(timeout=wait) if wait else self.messages.get_nowait())
            while True:
                got.append(self.messages.get_nowait())
        except queue.Empty:
            pass
        return got

    def stop(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()
        self._clients.clear()

    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
