// Who does what in a cluster: the active KRaft controller, the transaction coordinator of a
// transactional id, and the leader of each partition of a topic.
// Run with the broker's jars on the class path:
//   java -cp 'jars/*' Roles.java <bootstrap> <transactional id> <topic>
// Prints one line: controller=<id> coordinator=<id> leaders=<partition>:<id>,...
import java.util.List;
import java.util.Properties;
import java.util.TreeMap;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.TopicDescription;

public class Roles {
    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "10000");
        try (Admin admin = Admin.create(p)) {
            int controller = admin.describeMetadataQuorum().quorumInfo().get(10, TimeUnit.SECONDS).leaderId();
            int coordinator = admin.describeTransactions(List.of(args[1])).description(args[1])
                .get(10, TimeUnit.SECONDS).coordinatorId();
            TopicDescription d = admin.describeTopics(List.of(args[2])).topicNameValues().get(args[2])
                .get(10, TimeUnit.SECONDS);
            TreeMap<Integer, Integer> leaders = new TreeMap<>();
            d.partitions().forEach(t -> leaders.put(t.partition(), t.leader() == null ? -1 : t.leader().id()));
            StringBuilder b = new StringBuilder();
            leaders.forEach((k, v) -> b.append(b.length() == 0 ? "" : ",").append(k).append(':').append(v));
            System.out.println("controller=" + controller + " coordinator=" + coordinator + " leaders=" + b);
        }
    }
}
