package leasehold.pekko;

import com.google.protobuf.ByteString;
import io.grpc.CallOptions;
import io.grpc.ManagedChannel;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import io.grpc.stub.ClientCalls;
import io.grpc.stub.StreamObserver;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;

/**
 * The client loop both systems are driven with: `inflight` calls kept in flight, each to
 * a random one of `keys` keys through a random one of the given gRPC ports, for `warmup`
 * seconds unmeasured, then `seconds` measured. Prints one line:
 * {@code calls_per_second=… p50_us=… p99_us=… errors=…}.
 *
 * <p>Arguments: warmup seconds, measured seconds, in flight, keys, then either ports
 * (each call enters a random one) or {@code @FILE}: lines {@code key port}, each call
 * takes a random line (a client that calls each key's owner).
 */
public final class Load {
  private Load() {}

  public static void main(String[] args) throws Exception {
    int warmup = Integer.parseInt(args[0]);
    int seconds = Integer.parseInt(args[1]);
    int inflight = Integer.parseInt(args[2]);
    int keys = Integer.parseInt(args[3]);
    List<ManagedChannel> channels = new ArrayList<>();
    java.util.Map<Integer, ManagedChannel> byPort = new java.util.HashMap<>();
    List<String> routeKeys = new ArrayList<>();
    List<ManagedChannel> routeChannels = new ArrayList<>();
    java.util.function.IntFunction<ManagedChannel> channel =
        port ->
            byPort.computeIfAbsent(
                port,
                p ->
                    NettyChannelBuilder.forAddress("127.0.0.1", p)
                        .usePlaintext()
                        .directExecutor()
                        .build());
    if (args[4].startsWith("@")) {
      for (String line : java.nio.file.Files.readAllLines(java.nio.file.Path.of(args[4].substring(1)))) {
        String[] kv = line.trim().split(" ");
        if (kv.length == 2) {
          routeKeys.add(kv[0]);
          routeChannels.add(channel.apply(Integer.parseInt(kv[1])));
        }
      }
    } else {
      for (String port : Arrays.copyOfRange(args, 4, args.length)) {
        channels.add(channel.apply(Integer.parseInt(port)));
      }
    }
    ByteString payload = ByteString.copyFromUtf8("x".repeat(100));
    AtomicBoolean measuring = new AtomicBoolean(false);
    AtomicBoolean stopping = new AtomicBoolean(false);
    AtomicLong done = new AtomicLong();
    AtomicLong errors = new AtomicLong();
    // Latencies of measured calls in microseconds (bounded: the run is short).
    long[] latencies = new long[4_000_000];
    AtomicLong recorded = new AtomicLong();
    CountDownLatch stopped = new CountDownLatch(inflight);

    class Caller {
      void next() {
        if (stopping.get()) {
          stopped.countDown();
          return;
        }
        ThreadLocalRandom r = ThreadLocalRandom.current();
        ManagedChannel ch;
        String key;
        if (routeKeys.isEmpty()) {
          ch = channels.get(r.nextInt(channels.size()));
          key = "key-" + r.nextInt(keys);
        } else {
          int i = r.nextInt(routeKeys.size());
          ch = routeChannels.get(i);
          key = routeKeys.get(i);
        }
        Wire.Request req = new Wire.Request(key, payload);
        long start = System.nanoTime();
        ClientCalls.asyncUnaryCall(
            ch.newCall(Wire.CALL, CallOptions.DEFAULT.withDeadlineAfter(5, TimeUnit.SECONDS)),
            req,
            new StreamObserver<Wire.Response>() {
              @Override
              public void onNext(Wire.Response value) {}

              @Override
              public void onError(Throwable t) {
                if (measuring.get()) {
                  errors.incrementAndGet();
                }
                next();
              }

              @Override
              public void onCompleted() {
                if (measuring.get()) {
                  long i = recorded.getAndIncrement();
                  if (i < latencies.length) {
                    latencies[(int) i] = (System.nanoTime() - start) / 1000;
                  }
                  done.incrementAndGet();
                }
                next();
              }
            });
      }
    }
    for (int i = 0; i < inflight; i++) {
      new Caller().next();
    }
    Thread.sleep(warmup * 1000L);
    long t0 = System.nanoTime();
    measuring.set(true);
    Thread.sleep(seconds * 1000L);
    measuring.set(false);
    double elapsed = (System.nanoTime() - t0) / 1e9;
    long calls = done.get();
    stopping.set(true);
    stopped.await(10, TimeUnit.SECONDS);
    int n = (int) Math.min(recorded.get(), latencies.length);
    long[] sorted = Arrays.copyOf(latencies, n);
    Arrays.sort(sorted);
    long p50 = n == 0 ? 0 : sorted[n / 2];
    long p99 = n == 0 ? 0 : sorted[(int) (n * 0.99)];
    System.out.printf(
        "calls_per_second=%.0f p50_us=%d p99_us=%d errors=%d%n",
        calls / elapsed, p50, p99, errors.get());
    for (ManagedChannel ch : byPort.values()) {
      ch.shutdownNow();
    }
  }
}
