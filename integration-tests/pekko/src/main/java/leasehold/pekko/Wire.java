package leasehold.pekko;

import com.google.protobuf.ByteString;
import com.google.protobuf.CodedInputStream;
import com.google.protobuf.CodedOutputStream;
import io.grpc.MethodDescriptor;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;

/**
 * `leasehold.v1.Entities/Call` on the wire, written by hand (no code generation): the
 * request's key (1) and payload (2), the answer's payload (1). The other answer fields
 * are skipped when read and not written by the Pekko node.
 */
final class Wire {
  private Wire() {}

  record Request(String key, ByteString payload) {}

  record Response(ByteString payload) {}

  static final MethodDescriptor<Request, Response> CALL =
      MethodDescriptor.<Request, Response>newBuilder()
          .setType(MethodDescriptor.MethodType.UNARY)
          .setFullMethodName("leasehold.v1.Entities/Call")
          .setRequestMarshaller(new RequestMarshaller())
          .setResponseMarshaller(new ResponseMarshaller())
          .build();

  private static byte[] bytes(InputStream in) {
    try {
      return in.readAllBytes();
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
  }

  private static final class RequestMarshaller implements MethodDescriptor.Marshaller<Request> {
    @Override
    public InputStream stream(Request r) {
      try {
        int size =
            CodedOutputStream.computeStringSize(1, r.key())
                + CodedOutputStream.computeBytesSize(2, r.payload());
        byte[] out = new byte[size];
        CodedOutputStream o = CodedOutputStream.newInstance(out);
        o.writeString(1, r.key());
        o.writeBytes(2, r.payload());
        o.checkNoSpaceLeft();
        return new ByteArrayInputStream(out);
      } catch (IOException e) {
        throw new UncheckedIOException(e);
      }
    }

    @Override
    public Request parse(InputStream stream) {
      try {
        CodedInputStream in = CodedInputStream.newInstance(bytes(stream));
        String key = "";
        ByteString payload = ByteString.EMPTY;
        for (int tag = in.readTag(); tag != 0; tag = in.readTag()) {
          switch (tag >>> 3) {
            case 1 -> key = in.readStringRequireUtf8();
            case 2 -> payload = in.readBytes();
            default -> in.skipField(tag);
          }
        }
        return new Request(key, payload);
      } catch (IOException e) {
        throw new UncheckedIOException(e);
      }
    }
  }

  private static final class ResponseMarshaller implements MethodDescriptor.Marshaller<Response> {
    @Override
    public InputStream stream(Response r) {
      try {
        byte[] out = new byte[CodedOutputStream.computeBytesSize(1, r.payload())];
        CodedOutputStream o = CodedOutputStream.newInstance(out);
        o.writeBytes(1, r.payload());
        o.checkNoSpaceLeft();
        return new ByteArrayInputStream(out);
      } catch (IOException e) {
        throw new UncheckedIOException(e);
      }
    }

    @Override
    public Response parse(InputStream stream) {
      try {
        CodedInputStream in = CodedInputStream.newInstance(bytes(stream));
        ByteString payload = ByteString.EMPTY;
        for (int tag = in.readTag(); tag != 0; tag = in.readTag()) {
          if (tag >>> 3 == 1) {
            payload = in.readBytes();
          } else {
            in.skipField(tag);
          }
        }
        return new Response(payload);
      } catch (IOException e) {
        throw new UncheckedIOException(e);
      }
    }
  }
}
