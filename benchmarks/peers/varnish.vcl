# Varnish as the peer cache: the built-in VCL (which honours the origin's
# Cache-Control and collapses concurrent misses by default) plus an X-Cache
# header like the other caches.  Storage and threads are set on the command
# line (malloc, thread_pools=1).
vcl 4.1;

backend origin {
    .host = "{{origin_host}}";
    .port = "{{origin_port}}";
    .first_byte_timeout = 60s;
}

sub vcl_deliver {
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
}
