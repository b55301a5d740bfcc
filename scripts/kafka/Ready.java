// Waits until a Kafka broker answers a metadata request (describeCluster), or a deadline passes.
// Run with the broker's jars on the class path:
//   java -cp 'jars/*' Ready.java <bootstrap> <seconds> [<brokers, default 1>]
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public class Ready {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
        int want = args.length > 2 ? Integer.parseInt(args[2]) : 1;
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "2000");
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        try (Admin admin = Admin.create(p)) {
            while (true) {
                try {
                    int n = admin.describeCluster().nodes().get(3, TimeUnit.SECONDS).size();
                    String controller = String.valueOf(admin.describeCluster().controller().get(3, TimeUnit.SECONDS));
                    if (n >= want) {
                        System.out.println("ready: " + n + " broker(s), controller " + controller);
                        return;
                    }
                    if (System.nanoTime() > deadline) {
                        System.err.println("not ready: " + n + " of " + want + " brokers");
                        System.exit(1);
                    }
                    Thread.sleep(200);
                } catch (Exception e) {
                    if (System.nanoTime() > deadline) {
                        System.err.println("not ready: " + e);
                        System.exit(1);
                    }
                    Thread.sleep(200);
                }
            }
        }
    }
}
