// Waits until every partition of every topic (internal ones included: the transaction state
// log, the consumer offsets) has all its replicas in sync, or a deadline passes.
// Run with the broker's jars on the class path:
//   java -cp 'jars/*' InSync.java <bootstrap> <seconds>
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ListTopicsOptions;

public class InSync {
    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "10000");
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
        String last = "not asked yet";
        try (Admin admin = Admin.create(p)) {
            while (System.nanoTime() < deadline) {
                try {
                    var names = admin.listTopics(new ListTopicsOptions().listInternal(true)).names().get(10, TimeUnit.SECONDS);
                    var topics = admin.describeTopics(names).allTopicNames().get(10, TimeUnit.SECONDS);
                    long behind = topics.values().stream()
                        .flatMap(t -> t.partitions().stream())
                        .filter(q -> q.isr().size() < q.replicas().size())
                        .count();
                    if (behind == 0) {
                        System.out.println("in sync: " + topics.size() + " topics");
                        return;
                    }
                    last = behind + " partitions with replicas out of sync";
                } catch (Exception e) {
                    last = e.toString();
                }
                Thread.sleep(250);
            }
        }
        System.err.println("not in sync: " + last);
        System.exit(1);
    }
}
