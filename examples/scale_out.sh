#!/usr/bin/env bash
# Two `candle-phi serve` replicas behind nginx, all on loopback: the way to serve more users
# than one process can (one per machine or per NUMA node, each with its own threads).
#
#   bash examples/scale_out.sh MODEL.gguf [TOKENIZER.json]
#
# nginx (Debian: apt install nginx) balances by least connections, so a long stream does not
# pile new requests on its replica, and passes server-sent events through unbuffered. The
# script starts both replicas and nginx, sends chat requests through nginx, shows which
# replica answered each (their access logs), and stops everything on exit.
set -euo pipefail
model=${1:?usage: scale_out.sh MODEL.gguf [TOKENIZER.json]}
tokenizer=${2:-}
python=${PYTHON:-python3}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ports=()
for replica in 1 2; do
    port=$(free_port)
    ports+=("$port")
    "$python" -m candle_phi serve --model "$model" ${tokenizer:+--tokenizer "$tokenizer"} \
        --host 127.0.0.1 --port "$port" --threads 1 --verbose 2>"$work/replica$replica.log" &
    pids+=($!)
done
# Each replica prints its address once it listens.
for replica in 1 2; do
    until grep -q "serving .* on http" "$work/replica$replica.log"; do
        kill -0 "${pids[$((replica - 1))]}" || { cat "$work/replica$replica.log"; exit 1; }
        sleep 0.2
    done
done

front=$(free_port)
cat >"$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;
    uwsgi_temp_path $work; scgi_temp_path $work;
    upstream candle_phi {
        least_conn;
        server 127.0.0.1:${ports[0]};
        server 127.0.0.1:${ports[1]};
    }
    server {
        listen 127.0.0.1:$front;
        location / {
            proxy_pass http://candle_phi;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;          # server-sent events go out as they come
            proxy_read_timeout 1h;
        }
    }
}
CONF
nginx -c "$work/nginx.conf" -p "$work"
echo "nginx on http://127.0.0.1:$front -> replicas on ports ${ports[*]}"
until curl -sf "http://127.0.0.1:$front/health" >/dev/null; do sleep 0.2; done

# Eight concurrent requests through the balancer, half of them streamed.
for i in $(seq 1 8); do
    stream=$([ $((i % 2)) -eq 0 ] && echo true || echo false)
    curl -sf "http://127.0.0.1:$front/v1/chat/completions" -H 'Content-Type: application/json' \
        -d "{\"messages\":[{\"role\":\"user\",\"content\":\"Hello $i\"}],\"max_tokens\":16,\"stream\":$stream}" \
        -o "$work/reply$i" &
done
wait_for_replies() { for job in $(jobs -p); do case " ${pids[*]} " in *" $job "*) ;; *) wait "$job";; esac; done; }
wait_for_replies
for i in $(seq 1 8); do
    if [ "$(head -c 5 "$work/reply$i")" = "data:" ]; then
        tail -n 2 "$work/reply$i" | head -n 1 | grep -q '\[DONE\]' && echo "reply $i: streamed, ends with [DONE]"
    else
        "$python" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("reply", sys.argv[2] + ":", r["usage"]["completion_tokens"], "tokens,", r["choices"][0]["finish_reason"])' "$work/reply$i" "$i"
    fi
done
for replica in 1 2; do
    served=$(grep -c '"POST /v1/chat/completions" 200' "$work/replica$replica.log" || true)
    echo "replica $replica (port ${ports[$((replica - 1))]}): $served chat requests"
done
