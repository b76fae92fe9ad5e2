package leasehold.pekko;

import com.typesafe.config.Config;
import com.typesafe.config.ConfigFactory;
import io.grpc.ServerServiceDefinition;
import io.grpc.Status;
import io.grpc.netty.shaded.io.grpc.netty.NettyServerBuilder;
import io.grpc.stub.ServerCalls;
import java.net.InetSocketAddress;
import java.time.Duration;
import org.apache.pekko.actor.typed.ActorRef;
import org.apache.pekko.actor.typed.ActorSystem;
import org.apache.pekko.actor.typed.Behavior;
import org.apache.pekko.actor.typed.javadsl.Behaviors;
import org.apache.pekko.cluster.MemberStatus;
import org.apache.pekko.cluster.sharding.typed.javadsl.ClusterSharding;
import org.apache.pekko.cluster.sharding.typed.javadsl.Entity;
import org.apache.pekko.cluster.sharding.typed.javadsl.EntityTypeKey;
import org.apache.pekko.cluster.typed.Cluster;

/**
 * One Pekko Cluster Sharding node serving `Entities.Call` over gRPC: each key is a
 * sharded entity that answers the payload it gets (the echo handler Leasehold runs in
 * the same benchmark). Calls entering a node that does not host the key's shard are
 * forwarded by Pekko, as Leasehold forwards to the key's owner.
 *
 * <p>Arguments: cluster port, gRPC port, seed node's cluster port, cluster size. Prints
 * "ready" once the cluster has that many members up.
 */
public final class Node {
  private Node() {}

  /** Messages between nodes, serialized with Jackson CBOR (Pekko's recommendation). */
  public interface Message {}

  public record Call(byte[] payload, ActorRef<Reply> replyTo) implements Message {}

  public record Reply(byte[] payload) implements Message {}

  static final EntityTypeKey<Call> ECHO = EntityTypeKey.create(Call.class, "Echo");

  static Behavior<Call> echo() {
    return Behaviors.receive(Call.class)
        .onMessage(
            Call.class,
            c -> {
              c.replyTo().tell(new Reply(c.payload()));
              return Behaviors.same();
            })
        .build();
  }

  public static void main(String[] args) throws Exception {
    int port = Integer.parseInt(args[0]);
    int grpcPort = Integer.parseInt(args[1]);
    int seed = Integer.parseInt(args[2]);
    int size = Integer.parseInt(args[3]);
    Config config =
        ConfigFactory.parseString(
                String.join(
                    "\n",
                    "pekko.actor.provider = cluster",
                    "pekko.loglevel = WARNING",
                    "pekko.remote.artery.canonical.hostname = \"127.0.0.1\"",
                    "pekko.remote.artery.canonical.port = " + port,
                    "pekko.cluster.seed-nodes = [\"pekko://bench@127.0.0.1:" + seed + "\"]",
                    "pekko.cluster.min-nr-of-members = " + size,
                    "pekko.cluster.downing-provider-class ="
                        + " \"org.apache.pekko.cluster.sbr.SplitBrainResolverProvider\"",
                    "pekko.actor.serialization-bindings {",
                    "  \"leasehold.pekko.Node$Message\" = jackson-cbor",
                    "}"))
            .withFallback(ConfigFactory.load());
    ActorSystem<Void> system = ActorSystem.create(Behaviors.empty(), "bench", config);
    ClusterSharding sharding = ClusterSharding.get(system);
    sharding.init(Entity.of(ECHO, ctx -> echo()));
    Duration timeout = Duration.ofSeconds(5);

    ServerServiceDefinition service =
        ServerServiceDefinition.builder("leasehold.v1.Entities")
            .addMethod(
                Wire.CALL,
                ServerCalls.asyncUnaryCall(
                    (request, observer) ->
                        sharding
                            .entityRefFor(ECHO, request.key())
                            .<Reply>ask(
                                replyTo -> new Call(request.payload().toByteArray(), replyTo),
                                timeout)
                            .whenComplete(
                                (reply, error) -> {
                                  if (error != null) {
                                    observer.onError(
                                        Status.UNAVAILABLE
                                            .withDescription(error.toString())
                                            .asRuntimeException());
                                  } else {
                                    observer.onNext(
                                        new Wire.Response(
                                            com.google.protobuf.ByteString.copyFrom(
                                                reply.payload())));
                                    observer.onCompleted();
                                  }
                                })))
            .build();
    NettyServerBuilder.forAddress(new InetSocketAddress("127.0.0.1", grpcPort))
        .directExecutor()
        .addService(service)
        .build()
        .start();

    // Ready once every member is up (sharding allocates shards only then).
    Cluster cluster = Cluster.get(system);
    while (true) {
      long up = 0;
      for (org.apache.pekko.cluster.Member m : cluster.state().getMembers()) {
        if (m.status() == MemberStatus.up()) {
          up++;
        }
      }
      if (up >= size) {
        break;
      }
      Thread.sleep(100);
    }
    System.out.println("ready");
    System.out.flush();
    system.getWhenTerminated().toCompletableFuture().join();
  }
}
