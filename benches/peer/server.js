'use strict';
// The benchmarks' peer: the stack chatbus is compared against, a Node.js chat server built
// the common way, with Socket.IO 4.8 and its Redis adapter (@socket.io/redis-adapter over
// ioredis) for fan-out between instances.
//
// Protocol (what the Rust load generator speaks with `--protocol socketio`):
//   client -> server  emit('event:message', <string>)
//   server -> all     io.emit('message', { message: <the same string> })
// io.emit reaches this instance's sockets directly and every other instance through a Redis
// pub/sub publish, so N instances on one redis-server form one chat, as chatbus does.
//
// Environment: PORT (HTTP and WebSocket, default 8001), REDIS_PORT (default 6390). Both the
// listener and the Redis connections use 127.0.0.1 only: this is a benchmark peer, never a
// service. GET /healthz answers 200 with a small JSON status once Redis is connected.
//
// Run with (from the repository root):
//   (cd benches/peer && npm ci)
//   redis-server --port 6390 --bind 127.0.0.1 --save '' &
//   PORT=8001 REDIS_PORT=6390 node benches/peer/server.js
// scripts/bench/*.sh do all of this on free ports (see scripts/bench/lib.sh).

const http = require('node:http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { Redis } = require('ioredis');

const LOOPBACK = '127.0.0.1';

// A port from the environment, or the default; anything else stops the process at once
// rather than listening somewhere unexpected.
function portFrom(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const port = Number(raw);
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new Error(`${name}=${raw} is not a TCP port`);
  }
  return port;
}

// Resolves once the client is ready; rejects if it gives up first (ioredis retries on its
// own, so a refused connection alone is not an error; a bounded wait is).
function whenReady(client, what, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${what}: not ready after ${ms} ms`)), ms);
    client.once('ready', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

async function start() {
  const port = portFrom('PORT', 8001);
  const redisPort = portFrom('REDIS_PORT', 6390);

  // The adapter needs two connections: a subscriber cannot publish.
  const pub = new Redis({ host: LOOPBACK, port: redisPort });
  const sub = pub.duplicate();
  for (const [client, what] of [[pub, 'redis publisher'], [sub, 'redis subscriber']]) {
    client.on('error', (err) => console.error(`${what}: ${err.message}`));
  }
  await Promise.all([whenReady(pub, 'redis publisher', 15000), whenReady(sub, 'redis subscriber', 15000)]);

  let io = null;
  const httpServer = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/healthz') {
      const body = JSON.stringify({
        ok: true,
        pid: process.pid,
        port,
        redisPort,
        clients: io ? io.engine.clientsCount : 0,
        rssBytes: process.memoryUsage.rss(),
      });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      res.end(body);
      return;
    }
    // Socket.IO answers its own path (/socket.io/) on this server; the rest does not exist.
    if (!req.url.startsWith('/socket.io/')) {
      res.writeHead(404, { 'content-length': 0 });
      res.end();
    }
  });

  io = new Server(httpServer, {
    adapter: createAdapter(pub, sub),
    // The load generator brings its own client; nothing here serves a browser.
    serveClient: false,
  });

  io.on('connection', (socket) => {
    socket.on('event:message', (message) => {
      // Only strings are chat messages; anything else is dropped, not echoed.
      if (typeof message === 'string') io.emit('message', { message });
    });
  });

  await new Promise((resolve, reject) => {
    httpServer.once('error', reject);
    httpServer.listen(port, LOOPBACK, resolve);
  });
  console.log(`peer: pid ${process.pid} on http://${LOOPBACK}:${port} (redis ${LOOPBACK}:${redisPort})`);

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    console.log(`peer: ${signal}, closing`);
    io.close();
    pub.disconnect();
    sub.disconnect();
    // Whatever is still open after a moment (a slow socket) must not keep the process alive.
    setTimeout(() => process.exit(0), 500).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

start().catch((err) => {
  console.error(`peer: ${err.message}`);
  process.exit(1);
});
